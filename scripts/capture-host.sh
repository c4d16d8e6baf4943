#!/bin/sh
# Copy what coreslice's host discovery reads (DESIGN.md section 2) into OUTDIR, with the same
# paths, so that `coreslice host show --root OUTDIR` and the tests read it as a live host.
# Read-only on the host; run as root to include the ACPI tables, the MSR and the kernel log.
# POSIX sh (runs under dash, e.g. as a `coreslice testbed run --host-cmd`).
#
#   sh scripts/capture-host.sh OUTDIR
#
# The kernel log goes to OUTDIR/dev/kmsg as `dmesg` text; sysfs symlinks that discovery follows
# (bus/pci/devices/*, driver, physfn, virtfn*) are recreated as relative links inside OUTDIR.
set -u
OUT=${1:?usage: capture-host.sh OUTDIR}
mkdir -p "$OUT" || exit 1

copy() {  # copy FILE... (absolute paths) when readable; sysfs sizes lie, so cat, never cp
    for f in "$@"; do
        [ -f "$f" ] && [ -r "$f" ] || continue
        mkdir -p "$OUT$(dirname "$f")"
        cat "$f" >"$OUT$f" 2>/dev/null || rm -f "$OUT$f"
    done
}

relink() {  # relink LINK: recreate symlink LINK (absolute) as a relative link inside OUT
    target=$(readlink -f "$1") || return 0
    mkdir -p "$OUT$(dirname "$1")" "$OUT$target"
    up=$(dirname "$1" | sed 's|/[^/]*|../|g')
    ln -sfn "${up%/}$target" "$OUT$1"
}

copy /proc/iomem /proc/ioports /proc/cmdline /proc/cpuinfo /proc/consoles /proc/meminfo \
     /proc/sys/kernel/random/boot_id
for t in APIC MCFG SRAT SLIT; do copy "/sys/firmware/acpi/tables/$t"; done
for d in /sys/firmware/memmap/*; do copy "$d/start" "$d/end" "$d/type"; done
copy /sys/devices/system/cpu/present /sys/devices/system/cpu/online /sys/devices/system/cpu/possible
for d in /sys/devices/system/cpu/cpu[0-9]*; do
    mkdir -p "$OUT$d"
    [ -f "$d/firmware_node/uid" ] && mkdir -p "$OUT$d/firmware_node" &&
        cat "$d/firmware_node/uid" >"$OUT$d/firmware_node/uid"
done
copy /sys/devices/system/node/possible /sys/devices/system/node/online
for d in /sys/devices/system/node/node[0-9]*; do copy "$d/cpulist" "$d/meminfo"; done
for d in /sys/class/tty/ttyS*; do copy "$d/port" "$d/type" "$d/io_type"; done

# PCI: host bridges, then every function under its real path.
for d in /sys/devices/pci[0-9a-f]*:*; do
    [ -d "$d" ] || continue
    mkdir -p "$OUT$d"
    for b in "$d"/pci_bus/*; do [ -d "$b" ] && mkdir -p "$OUT$b"; done
done
for link in /sys/bus/pci/devices/*; do
    [ -e "$link" ] || continue
    relink "$link"
    d=$(readlink -f "$link")
    for a in class vendor device subsystem_vendor subsystem_device revision resource enable \
             secondary_bus_number subordinate_bus_number numa_node local_cpulist \
             sriov_totalvfs sriov_numvfs sriov_offset sriov_stride; do
        copy "$d/$a"
    done
    for l in "$d/driver" "$d/physfn" "$d"/virtfn*; do [ -L "$l" ] && relink "$l"; done
    for t in "$d"/tty/*; do [ -d "$t" ] && mkdir -p "$OUT$t"; done
done

# IA32_APIC_BASE (MSR 0x1b), at the same offset of a sparse file (needs the msr module).
if [ -r /dev/cpu/0/msr ]; then
    mkdir -p "$OUT/dev/cpu/0"
    dd if=/dev/cpu/0/msr of="$OUT/dev/cpu/0/msr" bs=8 count=1 iflag=skip_bytes skip=27 \
       oflag=seek_bytes seek=27 2>/dev/null || rm -f "$OUT/dev/cpu/0/msr"
fi
mkdir -p "$OUT/dev"
dmesg >"$OUT/dev/kmsg" 2>/dev/null || rm -f "$OUT/dev/kmsg"
# git keeps no empty directories; a marker keeps the tree's shape when it is committed.
find "$OUT" -type d -empty -exec touch {}/.gitkeep \;
echo "captured into $OUT"
