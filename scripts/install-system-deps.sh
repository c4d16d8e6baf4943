#!/usr/bin/env bash
# Install the system packages coreslice needs on Debian 12 (bookworm), as root.
#
#   bash scripts/install-system-deps.sh          what coreslice and its demo need
#   bash scripts/install-system-deps.sh --test   and what the test suite needs besides
#
# QEMU 10 and the 6.12 kernels (which the emulated machine boots) live in bookworm-backports,
# which a fresh machine does not enable.  We derive the backports entry from the machine's own
# Debian source, in either format a Debian 12 may have (deb822 *.sources, as cloud images
# write, or one-line sources.list, as the Debian installer writes): same URI, same signing
# key, so that no mirror host name is written into the project.
set -euo pipefail

say() { echo "install-system-deps: $*" >&2; }
die() { say "$*"; exit 2; }

with_test=0
for arg in "$@"; do
    case "$arg" in
        --test) with_test=1 ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$arg' (try --help)" ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "must run as root (as root: bash $0)"

codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}") || codename=""
[ "$codename" = bookworm ] ||
    die "this is not Debian 12 bookworm (/etc/os-release says '${codename:-nothing}'); run it on Debian 12"

list_dir=/etc/apt/sources.list.d
one_line=/etc/apt/sources.list

# Active (uncommented) APT source lines/stanzas that name bookworm-backports, in both formats.
backports_enabled() {
    local f
    for f in "$one_line" "$list_dir"/*.list "$list_dir"/*.sources; do
        [ -f "$f" ] || continue
        grep -Eqs '^[^#]*bookworm-backports' "$f" && return 0
    done
    return 1
}

# deb822: the first enabled stanza that lists the suite "bookworm" (the main archive, not
# -security or -updates alone).  Prints its URIs and Signed-By lines.
deb822_main_stanza() {
    awk '
        function flush() { if (suite && uris != "" && enabled) { print uris; if (signed != "") print signed; found = 1; exit } }
        /^[ \t]*#/ { next }
        /^[ \t]*$/ { flush(); uris = ""; signed = ""; suite = 0; enabled = 1; next }
        BEGIN { enabled = 1 }
        /^URIs:/ { uris = $0 }
        /^Signed-By:/ { signed = $0 }
        /^Enabled:[ \t]*no/ { enabled = 0 }
        /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm") suite = 1 }
        /^Types:/ { deb = 0; for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1; if (!deb) enabled = 0 }
        END { if (!found) flush() }
    ' "$1"
}

# One-line format: the first "deb [options] URI bookworm COMPONENTS" line.  Prints
# "deb [options] URI".
one_line_main() {
    awk '
        /^[ \t]*deb[ \t]/ {
            n = 2; opts = ""
            if ($2 ~ /^\[/) { while (n <= NF && $n !~ /\]$/) { opts = opts " " $n; n++ } opts = opts " " $n; n++ }
            if ($(n + 1) == "bookworm") { print "deb" opts " " $n; exit }
        }
    ' "$1"
}

enable_backports() {
    local f stanza line
    for f in "$list_dir"/*.sources; do
        [ -f "$f" ] || continue
        stanza=$(deb822_main_stanza "$f")
        if [ -n "$stanza" ]; then
            { echo "Types: deb"; echo "$stanza" | grep '^URIs:'; echo "Suites: bookworm-backports"
              echo "Components: main"; echo "$stanza" | grep '^Signed-By:' || true
            } >"$list_dir/coreslice-backports.sources"
            say "enabled bookworm-backports in $list_dir/coreslice-backports.sources (from $f)"
            return 0
        fi
    done
    for f in "$one_line" "$list_dir"/*.list; do
        [ -f "$f" ] || continue
        line=$(one_line_main "$f")
        if [ -n "$line" ]; then
            echo "$line bookworm-backports main" >"$list_dir/coreslice-backports.list"
            say "enabled bookworm-backports in $list_dir/coreslice-backports.list (from $f)"
            return 0
        fi
    done
    die "no APT source for Debian bookworm found in $one_line or $list_dir/; add the Debian archive, then re-run"
}

qemu_major() {  # the major version of the qemu-system-x86_64 on PATH, or 0
    local v
    v=$(qemu-system-x86_64 --version 2>/dev/null | sed -nE '1s/.*version ([0-9]+)\..*/\1/p') || true
    echo "${v:-0}"
}

# mkfs.ext4 -d reads a tarball from e2fsprogs 1.47.1 on (slice images are built from one).
e2fs_new_enough() {
    local v
    v=$(mke2fs -V 2>&1 | sed -nE '1s/^mke2fs ([0-9]+)\.([0-9]+)\.?([0-9]*).*/\1 \2 \3/p')
    [ -n "$v" ] && set -- $v && [ $(( $1 * 10000 + $2 * 100 + ${3:-0} )) -ge 14701 ]
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

updated=0
if ! backports_enabled; then
    enable_backports
    updated=1
fi
# A source enabled (by us or by hand) but never fetched: apt-cache knows nothing of it, and the
# testbed resolves its kernel with `apt-cache -t bookworm-backports`.
if ! ls /var/lib/apt/lists/*bookworm-backports*Packages* >/dev/null 2>&1; then
    updated=1
fi

# iproute2, nvme-cli and the ssh client run inside the emulated host (its root is this
# machine's); mmdebstrap, sfdisk (fdisk), libarchive (read by mkfs.ext4 -d) and e2fsprogs build
# the slices' disk images; acpica-tools checks the generated ACPI tables.
base_pkgs="e2fsprogs busybox-static cpio kmod iproute2 acpica-tools ca-certificates python3 python3-venv nvme-cli
 mmdebstrap fdisk libarchive13 openssh-client"
# systemd: its systemd-analyze verifies the units of `coreslice host install-units` (a container may lack it).
# sysbench: the native leg of the eval test runs it inside the emulated host, whose root is this machine's.
[ "$with_test" -eq 1 ] && base_pkgs="$base_pkgs git systemd sysbench"
# From backports: QEMU 10 (the emulated machine; its igb/nvme SR-IOV models need it).
bp_pkgs="qemu-system-x86 qemu-utils"

missing=""
for p in $base_pkgs; do installed "$p" || missing="$missing $p"; done
bp_missing=""
if [ "$(qemu_major)" -lt 10 ]; then
    bp_missing="$bp_pkgs"
fi
# e2fsprogs from backports (1.47.2) where the installed one cannot take a tarball.
if ! e2fs_new_enough; then
    bp_missing="$bp_missing e2fsprogs"
fi

if [ -z "$missing" ] && [ -z "$bp_missing" ] && [ "$updated" -eq 0 ]; then
    say "all system packages present (QEMU $(qemu_major))"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
if [ -n "$missing" ]; then
    apt-get install -y -q --no-install-recommends $missing
fi
if [ -n "$bp_missing" ]; then
    apt-get install -y -q --no-install-recommends -t bookworm-backports $bp_missing
fi
major=$(qemu_major)
[ "$major" -ge 10 ] || die "qemu-system-x86_64 is version $major after the install; QEMU 10 or newer is needed"
e2fs_new_enough || die "mke2fs is $(mke2fs -V 2>&1 | head -1) after the install; e2fsprogs 1.47.1 or newer is needed"
say "system packages installed (QEMU $major)"
