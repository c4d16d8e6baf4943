"""``coreslice host check``: is the running host ready to launch slices?

Each item is ``ok``, ``warn`` (slices boot, but something the reference setup has is missing)
or ``fail`` (``coreslice boot`` would refuse or break), with the fix.  Everything is read from
``coreslice.host.snapshot.discover(root)`` plus a few files under the same root, so tests run
it on synthetic trees; the only live-host probes (euid, opening and mapping /dev/mem) run when
the root is ``/``.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

from coreslice.errors import UsageError
from coreslice.host import memory
from coreslice.host.snapshot import Host, discover
from coreslice.host.sysfs import format_cpu_list, read_text
from coreslice.units import format_size

XAPIC_MAX_ID = 254  # 0xff is the xAPIC broadcast ID: xAPIC reaches APIC IDs 0-254 only
LOW_MEMORY_END = 1 << 20  # slices never get the first MiB (real-mode area)


@dataclass(frozen=True)
class Item:
    name: str
    status: str  # "ok" | "warn" | "fail"
    detail: str
    fix: str | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}


@dataclass
class Report:
    items: list[Item]
    free_cpus: list[int] = field(default_factory=list)
    free_memory: list[memory.Range] = field(default_factory=list)
    purpose: str = "launch slices"  # what "ready" means, for the last line of format()

    @property
    def ready(self) -> bool:
        return all(i.status != "fail" for i in self.items)

    def to_json(self) -> dict:
        return {
            "ready": self.ready,
            "items": [i.to_json() for i in self.items],
            "free": {"cpus": self.free_cpus,
                     "memory": [{"start": r.start, "end": r.end, "size": r.size} for r in self.free_memory]},
        }

    def format(self) -> str:
        out = []
        for i in self.items:
            out.append(f"{i.status:<5} {i.name:<12} {i.detail}")
            if i.fix:
                out.append(f"{'':18} fix: {i.fix}")
        out.append(f"ready to {self.purpose}" if self.ready else f"NOT ready to {self.purpose}")
        return "\n".join(out)


def cmdline_value(cmdline: str, key: str) -> str | None:
    """The last ``key=value`` on a kernel command line (the kernel's rule for these keys)."""
    value = None
    for word in cmdline.split():
        k, eq, v = word.partition("=")
        if k == key and eq:
            value = v
    return value


def free_memory(host: Host) -> list[memory.Range]:
    """Firmware RAM the host kernel does not use, above the first MiB."""
    free = memory.subtract(host.firmware_ram(), host.host_ram() + [memory.Range(0, LOW_MEMORY_END)])
    return [r for r in free if r.size >= 1 << 20]


def check_cpus(host: Host) -> Item:
    parked = [c for c in host.cpus if not c.online and not c.boot]
    maxcpus = cmdline_value(host.cmdline, "maxcpus")
    if not host.cpus:
        return Item("cpus", "fail", "no CPUs under /sys/devices/system/cpu",
                    "run on the host itself (or give --root a captured tree)")
    if not parked:
        return Item("cpus", "fail", f"all {len(host.cpus)} CPUs are online"
                    + (f" (maxcpus={maxcpus})" if maxcpus else " (no maxcpus=)"),
                    "boot the host with maxcpus=N below the CPU count: "
                    "coreslice host configure --profile slice-host, then reboot")
    ids = ",".join(str(c.apic_id) if c.apic_id is not None else "?" for c in parked)
    return Item("cpus", "ok", f"CPUs {format_cpu_list([c.cpu for c in parked])} are parked "
                f"(APIC IDs {ids}); the host runs {sum(c.online for c in host.cpus)} "
                f"(maxcpus={maxcpus or 'not set'})")


def check_memory(host: Host, free: list[memory.Range]) -> Item:
    mem = cmdline_value(host.cmdline, "mem")
    if not host.firmware_map:
        return Item("memory", "fail", "no firmware memory map (/sys/firmware/memmap)",
                    "use a kernel with CONFIG_FIRMWARE_MEMMAP (Debian and Ubuntu kernels have it)")
    if not free:
        ram_end = host.firmware_ram()[-1].end if host.firmware_ram() else 0
        return Item("memory", "fail", f"the host uses all RAM (mem={mem or 'not set'}; RAM ends at "
                    f"{ram_end:#x})", "boot the host with mem=SIZE below the RAM size: coreslice "
                    "host configure --profile slice-host --host-mem SIZE, then reboot")
    total = sum(r.size for r in free)
    ranges = ", ".join(f"{r.start:#x}-{r.end:#x}" for r in free)
    nodes = [n for n in getattr(host, "numa", []) if getattr(n, "free", None)]
    per_node = ("; per NUMA node: " + ", ".join(
        f"{n.node}: {format_size(sum(r.size for r in n.free) & ~0xFFFFF)}" for n in nodes)
        if len(nodes) > 1 else "")
    return Item("memory", "ok", f"{format_size(total & ~0xFFFFF)} of RAM above the host's "
                f"(mem={mem or 'not set'}): {ranges}{per_node}")


def interrupt_remapping(host: Host) -> str | None:
    """"on", "off" or None (the kernel log does not say), from the host's kernel log."""
    state = None
    for line in host.kernel_log:
        if "Enabled IRQ remapping" in line or "AMD-Vi: Interrupt remapping enabled" in line:
            state = "on"
        elif "IRQ remapping doesn't support X2APIC mode" in line or "Disabled IRQ remapping" in line:
            state = "off"
    if state is None and cmdline_value(host.cmdline, "intremap") == "off":
        state = "off"
    return state


def check_intremap(host: Host) -> Item:
    mode, ir = host.apic_mode, interrupt_remapping(host)
    high = [c for c in host.cpus if not c.online and (c.apic_id or 0) > XAPIC_MAX_ID]
    ir_text = {"on": "interrupt remapping on", "off": "interrupt remapping off",
               None: "no interrupt remapping in the kernel log"}[ir]
    if mode is None:
        return Item("intremap", "fail", f"APIC mode unknown ({ir_text})",
                    "modprobe msr (coreslice reads IA32_APIC_BASE through /dev/cpu/0/msr)")
    if mode == "x2apic":
        caveat = ("; devices given to slices must be polled: the IOMMU blocks their "
                  "compatibility-format MSIs" if ir == "on" else "")
        return Item("intremap", "ok", f"x2APIC mode, {ir_text} (source: {host.apic_mode_source}); "
                    f"coreslice wakes CPUs through the x2APIC ICR MSR{caveat}")
    if high:
        return Item("intremap", "fail", f"xAPIC mode, but CPUs {format_cpu_list([c.cpu for c in high])} "
                    f"have APIC IDs above {XAPIC_MAX_ID}, which xAPIC cannot wake",
                    "boot the host in x2APIC mode: drop intremap=off (coreslice host configure "
                    "--profile slice-host --intremap on), then reboot")
    if ir == "on":
        return Item("intremap", "warn", f"xAPIC mode with {ir_text}: the IOMMU blocks the MSIs of "
                    "devices given to slices", "add intremap=off (coreslice host configure "
                    "--profile slice-host), then reboot")
    return Item("intremap", "ok", f"xAPIC mode, {ir_text} (source: {host.apic_mode_source}); "
                "coreslice wakes CPUs through the mapped local APIC page")


def _msr_module_available(root: Path) -> bool:
    release = read_text(root, "proc/sys/kernel/osrelease")
    if not release:
        return False
    mods = root / "lib/modules" / release
    for name in ("modules.builtin", "modules.dep"):
        text = read_text(mods, name, "") or ""
        if any(line.split(":")[0].endswith(("/msr.ko", "/msr.ko.xz", "/msr.ko.zst", "/msr.ko.gz"))
               for line in text.splitlines()):
            return True
    return False


def check_msr(host: Host) -> Item:
    if (host.root / "dev/cpu/0/msr").exists():
        return Item("msr", "ok", "/dev/cpu/0/msr is there (msr driver loaded)")
    if _msr_module_available(host.root):
        return Item("msr", "ok", "msr driver not loaded; coreslice boot loads it (modprobe msr)")
    status = "fail" if host.apic_mode in ("x2apic", None) else "warn"
    return Item("msr", status, "no /dev/cpu/0/msr and no msr module for this kernel: x2APIC CPUs "
                "cannot be woken and the APIC mode is read from the kernel log only",
                "use a kernel with CONFIG_X86_MSR (Debian and Ubuntu build it as the msr module)")


def check_devmem(host: Host, free: list[memory.Range]) -> Item:
    path = host.root / "dev/mem"
    if not path.exists():
        return Item("devmem", "fail", f"no {path}", "use a kernel with CONFIG_DEVMEM (stock kernels have it)")
    if host.live and os.geteuid() != 0:
        return Item("devmem", "fail", "not running as root: /dev/mem needs CAP_SYS_RAWIO",
                    "run coreslice as root (sudo)")
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        return Item("devmem", "fail", f"cannot open {path}: {e.strerror}",
                    "run as root, outside a container or lockdown (check /sys/kernel/security/lockdown)")
    try:
        if host.live and free:
            # STRICT_DEVMEM lets mmap reach RAM the host does not own (DESIGN.md section 3): map
            # one page of the first free range read-only to prove it (nothing is written).
            try:
                mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ, offset=free[0].start).close()
            except OSError as e:
                return Item("devmem", "fail", f"{path} opens but mmap of free RAM at {free[0].start:#x} "
                            f"fails: {e.strerror}", "boot without lockdown (Secure Boot locks /dev/mem "
                            "down: see /sys/kernel/security/lockdown)")
            return Item("devmem", "ok", f"{path} opens read-write and maps free RAM at {free[0].start:#x}")
    finally:
        os.close(fd)
    return Item("devmem", "ok", f"{path} opens read-write")


def check_tsc(host: Host) -> Item:
    if host.tsc_khz is None:
        return Item("tsc", "warn", "no TSC calibration in the kernel log (rotated out?)",
                    "pass --tsc-khz to coreslice boot (the slice needs the host's TSC frequency)")
    return Item("tsc", "ok", f"TSC {host.tsc_khz / 1000:.3f} MHz, passed to slices as tsc_early_khz")


def check_corruption_check(host: Host) -> Item:
    if cmdline_value(host.cmdline, "memory_corruption_check") == "0":
        return Item("lowmem-scan", "ok", "memory_corruption_check=0")
    return Item("lowmem-scan", "warn", "no memory_corruption_check=0: the kernel's low-memory scan "
                "may report the slices' trampolines as corruption",
                "add memory_corruption_check=0 (coreslice host configure), then reboot")


def check_iommu(host: Host) -> Item:
    text = "\n".join(host.kernel_log)
    if cmdline_value(host.cmdline, "intel_iommu") == "off" or "DMAR: IOMMU disabled" in text:
        return Item("iommu", "ok", "IOMMU DMA translation off (intel_iommu=off)")
    if "DMAR: IOMMU enabled" in text or "AMD-Vi: AMD IOMMUv2" in text or "DMAR: Intel(R) Virtualization" in text:
        if cmdline_value(host.cmdline, "iommu") == "pt":
            return Item("iommu", "fail", "the IOMMU runs in passthrough (iommu=pt): a function the host lets go of "
                        "keeps an identity mapping, so slices' DMA is not confined",
                        "coreslice host configure --profile slice-host --iommu on (no iommu=pt), then reboot")
        if cmdline_value(host.cmdline, "intremap") != "off":
            return Item("iommu", "warn", "the IOMMU translates with interrupt remapping on: the slices' devices' "
                        "MSIs are blocked", "coreslice host configure --profile slice-host --iommu on, then reboot")
        return Item("iommu", "ok", "the IOMMU translates DMA: coreslice boot confines each slice's functions to "
                    "its RAM (a VFIO domain per slice)")
    return Item("iommu", "ok", "no IOMMU DMA translation in the kernel log")


def check_kernel(host: Host) -> Item:
    """Lockdown and the low-memory reservation, as boot checks them (plan/boot.py)."""
    from coreslice.plan.boot import check_host_kernel

    try:
        check_host_kernel(host)
    except UsageError as e:
        problem, _, fix = str(e).partition("; ")
        return Item("kernel", "fail", problem, fix)
    v = host.kernel_version
    return Item("kernel", "ok", f"{f'Linux {v[0]}.{v[1]}' if v else 'kernel version unknown'}, "
                f"lockdown {host.lockdown or 'not built in'}")


def check(root: Path | str = "/") -> Report:
    host = discover(root)
    free = free_memory(host)
    items = [check_kernel(host), check_cpus(host), check_memory(host, free), check_intremap(host), check_msr(host),
             check_devmem(host, free), check_tsc(host), check_corruption_check(host), check_iommu(host)]
    parked = [c.cpu for c in host.cpus if not c.online and not c.boot]
    return Report(items, parked, free)
