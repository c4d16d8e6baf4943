"""The two busybox initramfs images the testbed boots, and the slice report parser.

HOST initramfs: loads the 9p modules (and ``msr``, which coreslice needs in x2APIC mode: the
chroot's own /lib/modules has nothing for this kernel), mounts the build machine's root
read-only over 9p (tag ``hostroot``) and the per-run directory read-write (tag ``run``,
``cache=none`` so that files written from the outside are seen), prepares a chroot (proc, sys,
devtmpfs, tmpfs on /tmp and /run), runs ``$RUN_DIR/job.sh`` inside it and powers off.  The run
share holds a file ``env`` (shell assignments, at least ``RUN_DIR=``, the run directory's path
on the build machine, where the share is bind-mounted inside the chroot so that paths are the
same inside and outside) and a file ``mounts`` naming the other shares (the source tree, the
venv, the kernels' directories) and the path each is mounted at (testbed/hostview.py).  Console markers (ttyS0) are lines starting ``CORESLICE-HOST``.

SLICE initramfs: mounts proc/sys and writes one line to /dev/kmsg (with ``noapic`` user-space
console output is not seen on the UART; kernel messages are)::

    CORESLICE-REPORT cpus=<online cpus> mem_kib=<MemTotal kB> apic_ids=<a,b,..> cmdline=<...>

then, with ``coreslice.after=panic|reboot|poweroff|halt`` on its command line, ends that way
(sysrq ``c``, busybox ``reboot -f`` / ``poweroff -f`` / ``halt -f``), else idles forever.
:func:`parse_report` parses that line (also with a printk time prefix).

Images are cached in ``$CORESLICE_CACHE/initramfs/`` keyed by kernel release and a hash of the
init script (and module list); they are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import subprocess
from pathlib import Path

from coreslice.testbed.cpio import CpioWriter, gzip_bytes
from coreslice.testbed.report import DATA_FILE, REPORT_TAG, RESULT_FILE, RESULT_PREFIX
from coreslice.testbed.kernels import Kernel
from coreslice.testbed.paths import cache_dir
from coreslice.testbed.tools import ToolError, progress

BUSYBOX = Path("/bin/busybox")
FORMAT_VERSION = "1"
HOST_MODULES = ("netfs", "9pnet", "9pnet_virtio", "9p", "msr")

# 9p mount options (DESIGN.md section 3).
HOSTROOT_TAG = "hostroot"
RUN_TAG = "run"
HOSTROOT_OPTS = "trans=virtio,version=9p2000.L,ro,msize=1048576,cache=loose"
RUN_OPTS = "trans=virtio,version=9p2000.L,msize=1048576,cache=none"

HOST_MARK = "CORESLICE-HOST"

HOST_INIT = r"""#!/bin/sh
# coreslice testbed: emulated host init (PID 1 of the host initramfs).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
up() { read u _ </proc/uptime; echo "$u"; }
say() { echo "@MARK@ $* uptime=$(up)"; }
fail() { say "FAIL $*"; sleep 1; sync; poweroff -f; }
say "init"
for m in @MODULES@; do
    p=""
@PARAMS@    insmod "/lib/modules/$m.ko" $p || fail "insmod $m"
done
say "modules-loaded"
mkdir -p /newroot /mnt/run
mount -t 9p -o @HOSTROOT_OPTS@ @HOSTROOT_TAG@ /newroot || fail "mount 9p @HOSTROOT_TAG@"
mount -t 9p -o @RUN_OPTS@ @RUN_TAG@ /mnt/run || fail "mount 9p @RUN_TAG@"
[ -r /mnt/run/env ] || fail "no env file in the run share"
. /mnt/run/env
[ -n "$RUN_DIR" ] || fail "env does not set RUN_DIR"
mount -t proc proc /newroot/proc || fail "mount proc in chroot"
mount -t sysfs sysfs /newroot/sys || fail "mount sysfs in chroot"
mount -t devtmpfs devtmpfs /newroot/dev || fail "mount devtmpfs in chroot"
mkdir -p /newroot/dev/shm /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/tmp || fail "mount tmpfs on /tmp"
mount -t tmpfs tmpfs /newroot/run || fail "mount tmpfs on /run"
# Directories shared on their own (testbed/hostview.py), at their own paths: "TAG PATH" lines,
# parents first; a mount point below the tmpfs /tmp or /run is created first.
if [ -r /mnt/run/mounts ]; then
    while read -r tag path; do
        [ -n "$tag" ] || continue
        mkdir -p "/newroot$path" 2>/dev/null
        mount -t 9p -o @HOSTROOT_OPTS@ "$tag" "/newroot$path" || fail "mount 9p $tag on $path"
    done </mnt/run/mounts
fi
mkdir -p "/newroot$RUN_DIR" 2>/dev/null
mount -o bind /mnt/run "/newroot$RUN_DIR" || fail "bind run share on $RUN_DIR"
say "job-start $RUN_DIR/job.sh"
chroot /newroot /bin/sh "$RUN_DIR/job.sh"
rc=$?
say "job-end rc=$rc"
sync
poweroff -f
"""

SLICE_INIT = r"""#!/bin/sh
# coreslice testbed: slice init.  Reports once through /dev/kmsg, then idles.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
cpus=$(grep -c '^processor' /proc/cpuinfo)
mem=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
apic=$(awk -F': *' '/^apicid/ {printf "%s%s", sep, $2; sep=","}' /proc/cpuinfo)
pci=$(ls /sys/bus/pci/devices 2>/dev/null | tr '\n' ',' | sed 's/,$//')
# Where the kernel runs (physical): with KASLR, not where the loader put it.
kcode=$(sed -n 's/^ *\([0-9a-f]*\)-[0-9a-f]* : Kernel code$/\1/p' /proc/iomem | head -n 1)
[ -n "$kcode" ] || kcode=-
read -r cmdline </proc/cmdline
# coreslice.poke=PORT: one byte written to that I/O port before the report, a foreign access
# that `testbed run --audit` must find (tests/e2e/test_isolation.py).
poke=$(sed -n 's/.*coreslice\.poke=\([0-9a-fx]*\).*/\1/p' /proc/cmdline)
[ -z "$poke" ] || printf '\305' | dd of=/dev/port bs=1 seek=$((poke)) count=1 2>/dev/null
@DATA@line="@TAG@ cpus=$cpus mem_kib=$mem apic_ids=$apic pci=$pci kcode=$kcode@EXTRA@ cmdline=$cmdline"
echo "<2>$line" >/dev/kmsg
echo "$line" >/dev/console
# coreslice.after=panic|reboot|poweroff|halt: end the slice that way once it has reported
# (tests/e2e/test_crash_containment.py: the host must not notice).  sysrq-trigger works whatever
# kernel.sysrq says (CONFIG_MAGIC_SYSRQ=y in the Debian kernel); the others are busybox's, -f:
# straight to reboot(2), as a crashed or impatient user space would.
after=$(sed -n 's/.*coreslice\.after=\([a-z]*\).*/\1/p' /proc/cmdline)
if [ -n "$after" ]; then
    sleep 1
    echo "<2>@AFTER_TAG@ $after" >/dev/kmsg
    case "$after" in
        panic) echo c >/proc/sysrq-trigger ;;
        reboot) reboot -f ;;
        poweroff) poweroff -f ;;
        halt) halt -f ;;
        *) echo "<2>@AFTER_TAG@ unknown action $after" >/dev/kmsg ;;
    esac
fi
while true; do sleep 3600; done
"""

# The line the slice init logs just before its coreslice.after action.
AFTER_TAG = "coreslice-after:"


# Inserted into SLICE_INIT by slice_init_text(data=True) (coreslice testbed run --storage /
# --network, see testbed/datapath.py): load the modules, then act on coreslice.storage=1 (mount
# the only NVMe namespace, read /hello.txt, write /result.txt, unmount) and
# coreslice.net=ADDR/LEN,PEER (address the only NIC, ping PEER), and append the outcome to the
# report: " storage_read=<text|-> storage_written=<0|1> ping_ok=<0|1> rtt_ms=<ms|->".
SLICE_DATA = r"""log() { echo "<2>coreslice-data: $*" >/dev/kmsg; }
for m in @DATA_MODULES@; do insmod "/lib/modules/$m.ko" || log "insmod $m failed"; done
storage=$(sed -n 's/.*coreslice\.storage=\([^ ]*\).*/\1/p' /proc/cmdline)
net=$(sed -n 's/.*coreslice\.net=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$storage" ]; then
    sread=-; swritten=0; n=0
    while [ ! -b /dev/nvme0n1 ] && [ $n -lt 150 ]; do sleep 0.2; n=$((n+1)); done
    mkdir -p /mnt/disk
    if mount -t ext4 /dev/nvme0n1 /mnt/disk; then
        sread=$(tr -cd 'A-Za-z0-9._:-' </mnt/disk/@DATA_FILE@ | head -c 96)
        [ -n "$sread" ] || sread=-
        echo "@RESULT_PREFIX@ read=$sread" >/mnt/disk/@RESULT_FILE@ && sync && swritten=1
        umount /mnt/disk || swritten=0
    else
        log "mount /dev/nvme0n1 failed"
    fi
    log "storage read=$sread written=$swritten"
    extra="$extra storage_read=$sread storage_written=$swritten"
fi
if [ -n "$net" ]; then
    addr=${net%%,*}; peer=${net#*,}; ping_ok=0; rtt=-; dev=""; n=0
    while [ -z "$dev" ] && [ $n -lt 150 ]; do
        for d in /sys/class/net/*; do d=${d##*/}; [ "$d" = lo ] || dev=$d; done
        [ -n "$dev" ] || { sleep 0.2; n=$((n+1)); }
    done
    if [ -n "$dev" ]; then
        ip addr add "$addr" dev "$dev"; ip link set "$dev" up; n=0
        while [ "$(cat /sys/class/net/$dev/carrier 2>/dev/null)" != 1 ] && [ $n -lt 100 ]; do
            sleep 0.2; n=$((n+1))
        done
        out=$(ping -c 3 -w 20 "$peer" 2>&1)
        rtt=$(echo "$out" | sed -n 's#.*min/avg/max = [0-9.]*/\([0-9.]*\)/.*#\1#p')
        if [ -n "$rtt" ]; then ping_ok=1; else rtt=-; log "ping $peer: $out"; fi
    else
        log "no network interface"
    fi
    log "network dev=$dev ping_ok=$ping_ok rtt_ms=$rtt"
    extra="$extra ping_ok=$ping_ok rtt_ms=$rtt"
fi
"""


# Inserted into SLICE_INIT by slice_init_text(dma_probe=True) (coreslice testbed run --dma-probe,
# see testbed/dmaprobe.py).  With coreslice.dmaprobe=1 it makes the slice's edu copy 64 bytes
# of the slice's own RAM (its command line) and then of host physical @HOST_ADDR@ into the
# device's buffer and back into a scratch area of the slice's RAM, and compares with what the
# CPU reads there; appends " dma_own=<0|1|-> dma_host=<blocked|leaked|->" to the report.
#
# Where to DMA: /dev/mem (STRICT_DEVMEM, IO_STRICT_DEVMEM) refuses the slice's System RAM but
# not its e820 "reserved" loader data (plan/boot.py: zero page at data_addr, command line at
# +0x1000) nor memory outside its e820, like the host's.  The command line's address is in the
# kernel's copy of boot_params (cmd_line_ptr at 0x228, ext_cmd_line_ptr at 0x0c8,
# arch/x86/include/uapi/asm/bootparam.h); the loader's zero page just below it is dead once
# Linux has copied it, so zero_page+0xf00 (64 bytes) is the scratch destination.
# edu (hw/misc/edu.c): BAR0 registers 0x80 source, 0x88 destination, 0x90 count, 0x98 command
# (bit0 start/busy, bit1 1 = buffer -> RAM, bit2 irq), 4- or 8-byte accesses only; the buffer
# is at device address 0x40000; a transfer runs 100 ms (virtual clock) after the command.
# Every arithmetic operand read from outside is checked first: an ash syntax error would end
# PID 1.
SLICE_DMA = r"""if grep -q 'coreslice\.dmaprobe=1' /proc/cmdline; then
    dlog() { echo "<2>coreslice-dma: $*" >/dev/kmsg; }
    hex() { printf 0x%x "$1"; }
    rd() { devmem "$1" 64 2>/dev/null; }
    rd64() { s=""; i=0; while [ $i -lt 64 ]; do s="$s $(rd $(($1 + i)))"; i=$((i + 8)); done; echo $s; }
    words8() { set -- $1; [ $# = 8 ]; }
    zero() { i=0; while [ $i -lt 64 ]; do devmem $(($1 + i)) 64 0 || return 1; i=$((i + 8)); done; }
    edu_dma() {
        devmem $((bar + 0x80)) 64 $1 && devmem $((bar + 0x88)) 64 $2 &&
            devmem $((bar + 0x90)) 64 64 && devmem $((bar + 0x98)) 64 $3 ||
            { dlog "dma $(hex $1) -> $(hex $2): register write failed"; return 1; }
        n=0
        while :; do
            c=$(rd $((bar + 0x98))); [ -n "$c" ] || c=1
            [ $((c & 1)) = 0 ] && { dlog "dma $(hex $1) -> $(hex $2) cmd $3 done"; return 0; }
            [ $n -ge 50 ] && { dlog "dma $(hex $1) -> $(hex $2) cmd $3 still busy after 5 s"; return 1; }
            sleep 0.1; n=$((n + 1))
        done
    }
    dma_own=-; dma_host=-; edu=""
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat "$d/vendor" 2>/dev/null)" = @EDU_VENDOR@ ] &&
            [ "$(cat "$d/device" 2>/dev/null)" = @EDU_DEVICE@ ] && edu=$d
    done
    bar=; lo=; hi=
    [ -z "$edu" ] || read -r bar _ <"$edu/resource"
    lo=$(od -An -tu4 -j $((0x228)) -N4 /sys/kernel/boot_params/data 2>/dev/null | tr -d ' ')
    hi=$(od -An -tu4 -j $((0xc8)) -N4 /sys/kernel/boot_params/data 2>/dev/null | tr -d ' ')
    case "$bar" in 0x[0-9a-f]*) ;; *) bar=0 ;; esac
    case "$lo$hi" in ''|*[!0-9]*) lo=0; hi=0 ;; esac
    bar=$((bar)); cmd=$(( (hi << 32) | lo ))
    if [ -z "$edu" ]; then
        dlog "no edu (vendor @EDU_VENDOR@ device @EDU_DEVICE@) in /sys/bus/pci/devices"
    elif [ $bar = 0 ] || [ $cmd -lt $((0x100000)) ]; then
        dlog "${edu##*/}: bar0 $(hex $bar), command line at $(hex $cmd): cannot probe"
    else
        # Memory Space + Bus Master (PCI command register, config offset 4).
        printf '\006\000' | dd of="$edu/config" bs=1 seek=4 count=2 conv=notrunc 2>/dev/null ||
            dlog "cannot write the command register of ${edu##*/}"
        scratch=$((cmd - 0x1000 + 0xf00))
        dlog "edu ${edu##*/} bar0 $(hex $bar) command line $(hex $cmd) scratch $(hex $scratch)"
        want=$(rd64 $cmd)
        if zero $scratch && edu_dma $cmd 0x40000 1 && edu_dma 0x40000 $scratch 3; then
            got=$(rd64 $scratch)
            dlog "own: command line $want"
            dlog "own: scratch      $got"
            if words8 "$want" && words8 "$got"; then
                if [ "$got" = "$want" ]; then dma_own=1; else dma_own=0; fi
            fi
        fi
        truth=$(rd64 @HOST_ADDR@)
        if zero $scratch && edu_dma @HOST_ADDR@ 0x40000 1 && edu_dma 0x40000 $scratch 3; then
            got=$(rd64 $scratch)
            dlog "host: cpu read $truth"
            dlog "host: scratch  $got"
            if ! words8 "$truth" || ! words8 "$got"; then
                dlog "host: a read failed"
            elif [ -z "$(echo $truth | tr -d ' 0x')" ]; then
                dlog "host: $(hex @HOST_ADDR@) reads all zero: cannot tell"
            elif [ "$got" = "$truth" ]; then
                dma_host=leaked
            else
                dma_host=blocked
            fi
        fi
    fi
    dlog "dma_own=$dma_own dma_host=$dma_host"
    extra="$extra dma_own=$dma_own dma_host=$dma_host"
fi
"""

# Module parameters the host init passes at insmod: no interrupt remapping under --iommu
# (topology.IOMMU_DEVICE), so VFIO type1 would refuse every group without this.
HOST_MODULE_PARAMS = {"vfio_iommu_type1": "allow_unsafe_interrupts=1"}


def host_init_text(modules: tuple[str, ...] = HOST_MODULES) -> str:
    params = "".join(f'    [ "$m" = {m} ] && p="{v}"\n' for m, v in HOST_MODULE_PARAMS.items()
                     if m in modules)
    return (
        HOST_INIT.replace("@MARK@", HOST_MARK)
        .replace("@PARAMS@", params)
        .replace("@MODULES@", " ".join(modules))
        .replace("@HOSTROOT_OPTS@", HOSTROOT_OPTS)
        .replace("@HOSTROOT_TAG@", HOSTROOT_TAG)
        .replace("@RUN_OPTS@", RUN_OPTS)
        .replace("@RUN_TAG@", RUN_TAG)
    )


def slice_dma_text() -> str:
    """SLICE_DMA with the edu's IDs and the host address filled in."""
    from coreslice.testbed import dmaprobe

    return (SLICE_DMA.replace("@EDU_VENDOR@", f"{dmaprobe.EDU_VENDOR:#06x}")
            .replace("@EDU_DEVICE@", f"{dmaprobe.EDU_DEVICE:#06x}")
            .replace("@HOST_ADDR@", f"{dmaprobe.HOST_ADDR:#x}"))


def slice_init_text(data_modules: tuple[str, ...] = (), dma_probe: bool = False) -> str:
    """The slice's /init; with ``data_modules`` (the module file stems, in load order) it also
    runs the data path (SLICE_DATA), with ``dma_probe`` the DMA probe (SLICE_DMA)."""
    data = ""
    if data_modules:
        data += (SLICE_DATA.replace("@DATA_MODULES@", " ".join(data_modules))
                 .replace("@DATA_FILE@", DATA_FILE)
                 .replace("@RESULT_FILE@", RESULT_FILE)
                 .replace("@RESULT_PREFIX@", RESULT_PREFIX))
    if dma_probe:
        data += slice_dma_text()
    if data:
        data = 'extra=""\n' + data
    return (SLICE_INIT.replace("@DATA@", data).replace("@EXTRA@", "$extra" if data else "")
            .replace("@TAG@", REPORT_TAG).replace("@AFTER_TAG@", AFTER_TAG))


# --- module resolution ------------------------------------------------------------------------


def _stem(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return name.split(".ko", 1)[0]


def module_load_order(modules_dep: str, wanted: tuple[str, ...]) -> list[str]:
    """Relative paths (from modules.dep) of ``wanted`` modules and their dependencies, in a
    valid load order (dependencies first).  Module names match with ``-``/``_`` equivalence."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        mod = mod.strip()
        deps[mod] = rest.split()
        by_name[_stem(mod).replace("-", "_")] = mod
    order: list[str] = []
    for name in wanted:
        key = name.replace("-", "_")
        if key not in by_name:
            raise ToolError(f"module {name} is not in modules.dep of this kernel")
        mod = by_name[key]
        # modules.dep lists the dependencies of a module so that the last is loaded first.
        for p in [*reversed(deps[mod]), mod]:
            if p not in order:
                order.append(p)
    return order


def _read_module(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".gz"):
        return gzip.decompress(raw)
    if path.name.endswith(".zst"):
        raise ToolError(f"{path}: zstd-compressed modules are not supported by the testbed")
    return raw


# --- building ---------------------------------------------------------------------------------


def _busybox_applets() -> list[str]:
    if not BUSYBOX.is_file():
        raise ToolError(f"{BUSYBOX}: missing; apt-get install busybox-static")
    proc = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True)
    return sorted({a for a in proc.stdout.split() if a and "/" not in a and a != "busybox"})


def _base_archive(init_text: str) -> CpioWriter:
    w = CpioWriter()
    for d in ("bin", "dev", "proc", "sys", "tmp", "run", "mnt", "newroot", "lib", "lib/modules"):
        w.directory(d)
    w.char_device("dev/console", 5, 1)
    w.char_device("dev/kmsg", 1, 11)
    w.char_device("dev/null", 1, 3, mode=0o666)
    w.file("bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
    for applet in _busybox_applets():
        w.symlink(f"bin/{applet}", "busybox")
    w.file("init", init_text.encode(), mode=0o755)
    return w


def _cached_image(kind: str, kernel: Kernel, key_text: str, build) -> Path:
    digest = hashlib.sha256(
        f"{FORMAT_VERSION}\0{key_text}\0{BUSYBOX.stat().st_size}".encode()
    ).hexdigest()[:16]
    out_dir = cache_dir() / "initramfs"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{kind}-{kernel.release}-{digest}.cpio.gz"
    if path.is_file():
        return path
    progress(f"building {kind} initramfs {path.name}")
    data = gzip_bytes(build())
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def build_host_initramfs(kernel: Kernel, modules: tuple[str, ...] = HOST_MODULES) -> Path:
    """The host initramfs for ``kernel`` (cached)."""
    init_text = host_init_text(modules)

    def build() -> bytes:
        dep = (kernel.modules_dir / "modules.dep").read_text()
        order = module_load_order(dep, modules)
        w = _base_archive(init_text)
        for rel in order:
            w.file(f"lib/modules/{_stem(rel)}.ko", _read_module(kernel.modules_dir / rel))
        return w.finish()

    return _cached_image("host", kernel, init_text + "\0" + ",".join(modules), build)


def build_slice_initramfs(kernel: Kernel, modules: tuple[str, ...] = (), dma_probe: bool = False) -> Path:
    """The slice initramfs (cached).  Without ``modules`` it holds none and ``kernel`` only keys
    the cache; with them (e.g. datapath.DATA_MODULES) it holds them and their dependencies
    and its init runs the data path; with ``dma_probe`` its init runs the DMA probe."""
    if not modules:
        init_text = slice_init_text(dma_probe=dma_probe)
        return _cached_image("slice", kernel, init_text, lambda: _base_archive(init_text).finish())
    order = module_load_order((kernel.modules_dir / "modules.dep").read_text(), modules)
    init_text = slice_init_text(tuple(_stem(rel) for rel in order), dma_probe=dma_probe)

    def build() -> bytes:
        w = _base_archive(init_text)
        for rel in order:
            w.file(f"lib/modules/{_stem(rel)}.ko", _read_module(kernel.modules_dir / rel))
        return w.finish()

    return _cached_image("slice-data", kernel, init_text + "\0" + ",".join(order), build)


def host_data_modules(kernel: Kernel, modules: tuple[str, ...]) -> tuple[str, ...]:
    """HOST_MODULES plus ``modules`` and their dependencies, as file stems in load order (the
    host init insmods exactly this list)."""
    order = module_load_order((kernel.modules_dir / "modules.dep").read_text(), modules)
    extra = tuple(_stem(rel) for rel in order)
    return HOST_MODULES + tuple(m for m in extra if m not in HOST_MODULES)
