"""The plan of a comparison VM: a slice's resources -> the QEMU/KVM command line, the vCPU to host
CPU pinning, the huge pages to reserve and the NUMA node everything comes from.

A VM is only a fair baseline for a slice when it runs on the same physical cores and on memory of
the same NUMA node, so the plan refuses resources that span nodes instead of guessing.  Pure: the
host comes in as a discovered :class:`~coreslice.host.snapshot.Host`, everything else as plain
values; the CLI (cli/vm.py) reads the ledger and sysfs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from coreslice.errors import UsageError
from coreslice.host.snapshot import Host
from coreslice.host.sysfs import format_cpu_list
from coreslice.plan.boot import EFI_RUNTIME_PARAM, PANIC_PARAM, PCIE_PORTS_PARAM, REBOOT_PARAM
from coreslice.units import format_size

QEMU = "qemu-system-x86_64"
# Huge page sizes QEMU can back guest RAM with, and the hugetlbfs mount of each (Debian's systemd
# mounts /dev/hugepages with the default size, 2M on x86; 1G pages need their own mount, by
# convention /dev/hugepages1G with pagesize=1G).
HUGEPAGE_SIZES = {"2M": 2 << 20, "1G": 1 << 30}
HUGEPAGE_MOUNTS = {"2M": "/dev/hugepages", "1G": "/dev/hugepages1G"}
HUGEPAGE_CHOICES = (*HUGEPAGE_SIZES, "none")
# kvm: the baseline.  tcg: QEMU's software emulation, only to try the launcher where there is no
# KVM (the emulated testbed host); its figures compare nothing.  -cpu host exists only under KVM.
ACCEL_CPU = {"kvm": "host", "tcg": "max"}
MIB = 1 << 20

# What plan/boot.py's slice_cmdline adds for a kernel living in a slice (DESIGN.md §3): none of it
# belongs in a VM, which has an IOAPIC, timers, PCI config space and QEMU's own firmware.  Words
# equal to one of these, or starting with one of the prefixes, are dropped from a recorded command
# line; what remains is the user's part (and an image's root=).
SLICE_ONLY_WORDS = frozenset({"noapic", "tsc=reliable", "no5lvl", REBOOT_PARAM, PANIC_PARAM, EFI_RUNTIME_PARAM,
                              PCIE_PORTS_PARAM})
SLICE_ONLY_PREFIXES = ("console=", "earlyprintk=", "no_ipi_broadcast=", "tsc_early_khz=", "pci=", "reserve=",
                       "pci-vf-as-pf.")
# The VM's serial console: QEMU's first 16550 (COM1, ttyS0), written to the serial log file.
GUEST_CONSOLE = "console=ttyS0,115200n8"


@dataclass(frozen=True)
class VmResources:
    """What the VM copies from a slice (a ledger row or boot's flags)."""

    kernel: Path
    initrd: Path | None
    cpus: tuple[int, ...]
    mem_size: int
    mem_base: int | None = None   # None: boot flags without @BASE; the node then comes from the CPUs
    cmdline: str = ""             # the user's part, without coreslice's slice parameters
    devices: tuple[str, ...] = ()
    name: str = "vm"


@dataclass(frozen=True)
class Hugepages:
    size: str   # "2M" | "1G"
    count: int  # pages to reserve on ``node`` (nr_hugepages of that node's hugepages-<size>kB)
    node: int

    def to_json(self) -> dict:
        return {"size": self.size, "count": self.count, "node": self.node}


@dataclass(frozen=True)
class VmPlan:
    argv: list[str]
    pinning: dict[int, int]          # vCPU index -> host logical CPU
    hugepages: Hugepages | None      # None: --hugepages none
    numa_node: int
    serial_log: Path
    qmp_socket: Path
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"argv": list(self.argv), "pinning": {str(v): c for v, c in self.pinning.items()},
                "hugepages": self.hugepages.to_json() if self.hugepages else None, "numa_node": self.numa_node}


def guest_cmdline(recorded: str | None) -> str:
    """A slice's recorded kernel command line without what coreslice added for the slice."""
    return " ".join(w for w in (recorded or "").split()
                    if w not in SLICE_ONLY_WORDS and not w.startswith(SLICE_ONLY_PREFIXES))


def pinning(cpus) -> dict[int, int]:
    """vCPU i runs on the i-th CPU of the slice (lowest first)."""
    return dict(enumerate(sorted(cpus)))


def numa_node(host: Host, cpus, mem_base: int | None, mem_size: int) -> int:
    """The one node holding every CPU and the memory range; UsageError naming both otherwise."""
    by_cpu = {c.cpu: c for c in host.cpus}
    missing = sorted(c for c in cpus if c not in by_cpu)
    if missing:
        raise UsageError(f"CPU{'s' if len(missing) > 1 else ''} {format_cpu_list(missing)} not present on this host "
                         f"(present: {format_cpu_list(sorted(by_cpu)) or 'none'}); give CPUs of this host with --cpus")
    nodes: dict[int | None, list[int]] = {}
    for c in sorted(cpus):
        nodes.setdefault(by_cpu[c].node, []).append(c)
    if None in nodes:
        raise UsageError(f"CPU{'s' if len(nodes[None]) > 1 else ''} {format_cpu_list(nodes[None])} belong to no NUMA "
                         "node (the SRAT does not list them); give CPUs the SRAT places (coreslice host show)")
    if len(nodes) > 1:
        parts = "; ".join(f"CPU{'s' if len(v) > 1 else ''} {format_cpu_list(v)} on node {k}"
                          for k, v in sorted(nodes.items()))
        raise UsageError(f"the slice's CPUs span NUMA nodes ({parts}); a VM pinned across nodes is no fair "
                         "comparison: give CPUs of one node")
    (node,) = nodes
    if mem_base is not None:
        mem_node = next((n.node for n in host.numa
                         if any(r.contains(mem_base, mem_base + mem_size) for r in n.memory)), None)
        where = f"{format_size(mem_size)}@0x{mem_base:x}"
        if mem_node is None:
            raise UsageError(f"memory {where} is not RAM of one NUMA node of this host; give memory of node {node} "
                             "(coreslice list shows what is free)")
        if mem_node != node:
            raise UsageError(f"the slice's CPUs {format_cpu_list(sorted(cpus))} are on NUMA node {node} but its memory "
                             f"{where} is on node {mem_node}; give CPUs and memory of one node")
    return node


def hugepages(size: str, mem_size: int, node: int) -> Hugepages | None:
    """The pages of ``size`` that back ``mem_size`` on ``node``; None for "none"."""
    if size == "none":
        return None
    if size not in HUGEPAGE_SIZES:
        raise UsageError(f"--hugepages {size!r} is not a huge page size; use one of {', '.join(HUGEPAGE_CHOICES)}")
    page = HUGEPAGE_SIZES[size]
    if mem_size % page:
        raise UsageError(f"memory size {format_size(mem_size)} is not a multiple of the {size} huge page size; "
                         f"use a memory size that is, or --hugepages {'2M' if size == '1G' else 'none'}")
    return Hugepages(size, mem_size // page, node)


def plan_vm(host: Host, res: VmResources, *, hugepage_size: str = "2M", serial_log: Path,
            qmp_socket: Path, accel: str = "kvm") -> VmPlan:
    """The VM for ``res`` on ``host``: checked, then spelled out as QEMU's argv."""
    if accel not in ACCEL_CPU:
        raise UsageError(f"--accel {accel!r} is not an accelerator; use kvm (the baseline) or tcg")
    if not res.cpus:
        raise UsageError("the VM needs at least one CPU; give --cpus LIST or --like NAME")
    if res.mem_size <= 0 or res.mem_size % MIB:
        raise UsageError(f"memory size {format_size(res.mem_size)} is not a whole number of MiB, which QEMU's -m "
                         "takes; give e.g. --memory 1G")
    node = numa_node(host, res.cpus, res.mem_base, res.mem_size)
    pages = hugepages(hugepage_size, res.mem_size, node)
    pins = pinning(res.cpus)
    n = len(pins)
    mem = f"{res.mem_size // MIB}M"
    # One memory backend, bound to the node (policy=bind: allocation fails rather than spilling to
    # another node), preallocated so that no page fault is left for the measured run.
    common = f"id=mem0,size={mem},prealloc=on,host-nodes={node},policy=bind"
    if pages is None:
        backend = f"memory-backend-ram,{common}"
    else:
        backend = f"memory-backend-file,{common},mem-path={HUGEPAGE_MOUNTS[pages.size]},share=off"
    append = " ".join(w for w in (res.cmdline.strip(), GUEST_CONSOLE) if w)
    argv = [
        QEMU,
        # debug-threads: QEMU names each vCPU thread "CPU N/KVM", so ps/top show the pinning
        "-name", f"{res.name},debug-threads=on",
        "-machine", f"q35,accel={accel}",  # q35 (PCIe) as the emulated host
        "-cpu", ACCEL_CPU[accel],          # under KVM the host's CPUID, as the slice sees it
        "-smp", f"{n},sockets=1,cores={n},threads=1",  # one vCPU per pinned host CPU
        "-m", mem,
        "-object", backend,
        "-numa", f"node,nodeid=0,cpus=0-{n - 1},memdev=mem0",  # the guest's one node is that backend
        "-kernel", str(res.kernel),
    ]
    if res.initrd is not None:
        argv += ["-initrd", str(res.initrd)]
    argv += ["-append", append]
    for d in res.devices:
        argv += ["-device", f"vfio-pci,host={d}"]
    argv += [
        "-nodefaults",                 # no emulated NIC, VGA, CD-ROM: only what the slice has
        "-nographic",
        "-serial", f"file:{serial_log}",
        # The launcher asks QMP query-cpus-fast for each vCPU's thread id to pin it (section 1).
        "-qmp", f"unix:{qmp_socket},server=on,wait=off",
        "-S",                          # paused until every vCPU thread is pinned (vm/qmp.py), then cont
        "-no-reboot",                  # a guest reboot ends the VM, as a slice reboot ends the slice
    ]
    return VmPlan(argv=argv, pinning=pins, hugepages=pages, numa_node=node, serial_log=serial_log,
                  qmp_socket=qmp_socket)
