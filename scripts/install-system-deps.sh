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
apt-get update -q
apt-get install -y -q --no-install-recommends \
    busybox-static cpio kmod acpica-tools ca-certificates
apt-get install -y -q --no-install-recommends -t bookworm-backports \
    qemu-system-x86 qemu-utils
