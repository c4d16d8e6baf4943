#!/usr/bin/env bash
# Install the system packages coreslice needs on Debian 12 (bookworm), as root.
#
# QEMU 10 and the 6.12 kernels live in bookworm-backports, which a fresh machine does not
# enable.  We derive the backports entry from the machine's own Debian source (same URIs,
# same Signed-By) so that no mirror host name is written into the project.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-deps: must run as root (try: sudo $0)" >&2
    exit 2
fi

src=/etc/apt/sources.list.d/debian.sources
bp=/etc/apt/sources.list.d/coreslice-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    if [ ! -f "$src" ]; then
        echo "install-system-deps: $src not found; enable bookworm-backports by hand and re-run" >&2
        exit 2
    fi
    # Take the first stanza (the main archive): its URIs and Signed-By lines.
    uris=$(awk '/^URIs:/{print; exit}' "$src")
    signed=$(awk '/^Signed-By:/{print; exit}' "$src")
    {
        echo "Types: deb"
        echo "$uris"
        echo "Suites: bookworm-backports"
        echo "Components: main"
        [ -n "$signed" ] && echo "$signed"
    } > "$bp"
    echo "install-system-deps: enabled bookworm-backports in $bp"
fi

export DEBIAN_FRONTEND=noninteractive
base_pkgs="e2fsprogs busybox-static cpio kmod acpica-tools ca-certificates python3 python3-venv nvme-cli"
# From backports: QEMU 10 (the emulated machine; the igb/nvme SR-IOV models need it).
bp_pkgs="qemu-system-x86 qemu-utils"

missing=""
for p in $base_pkgs $bp_pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
qemu_major=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null | sed -E 's/^[0-9]+://; s/\..*//')
if [ -z "$missing" ] && [ "${qemu_major:-0}" -ge 10 ]; then
    echo "install-system-deps: all system packages present"
    exit 0
fi

apt-get update -q
apt-get install -y -q --no-install-recommends $base_pkgs
apt-get install -y -q --no-install-recommends -t bookworm-backports $bp_pkgs
