"""The emulated machine as data: its UARTs, root buses, NUMA split and QEMU command line (pure).

See qemu.py for the machine's layout table and the facts behind it; this module only decides
what the command line says, so tests check it without starting anything.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from coreslice.errors import UsageError

QEMU = "qemu-system-x86_64"
PCI_SERIAL_SLOT = 0x10
PCI_SERIAL_ADDRESS = f"0000:00:{PCI_SERIAL_SLOT:02x}.0"
# (name, iobase, irq) of the ISA UARTs left for slices; COM1 (0x3f8, irq 4) is the host's.
ISA_SLICE_UARTS: tuple[tuple[str, int, int], ...] = (
    ("com2", 0x2F8, 3),
    ("com3", 0x3E8, 4),
    ("com4", 0x2E8, 3),
)
# PCI UARTs on their own pxb-pcie root buses: (name, root bus number, pxb slot on bus 0).
# Bus numbers 0x20 apart leave room under each root; slots 0x11-0x13 are fixed so that the
# addresses never depend on the order of other devices.
PXB_SLICE_UARTS: tuple[tuple[str, int, int], ...] = (
    ("pxb1", 0x20, 0x11),
    ("pxb2", 0x40, 0x12),
    ("pxb3", 0x60, 0x13),
)
_SIZE_RE = re.compile(r"^[1-9][0-9]*[KMGT]?$", re.I)


def check_size(value: str, what: str) -> str:
    """Validate a memory size such as ``6G`` or ``1024M`` (QEMU / ``mem=`` syntax)."""
    if not _SIZE_RE.match(value):
        raise UsageError(f"{what} {value!r}: give a size like 512M, 1G or 6G")
    return value.upper()


def size_bytes(value: str) -> int:
    value = check_size(value, "size")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if value[-1] in mult:
        return int(value[:-1]) * mult[value[-1]]
    return int(value) << 20  # QEMU's -m default unit is MiB


@dataclass(frozen=True)
class Share:
    """A directory of the build machine exported over virtio-9p."""

    tag: str
    path: Path
    readonly: bool = True

    def args(self, i: int) -> list[str]:
        """-fsdev and its virtio-9p-pci device (what -virtfs expands to, plus ioeventfd=off).

        ioeventfd=off: a lifecycle run hung with two 9p requests the guest had published
        (avail idx 63466) and kicked (the device's avail_event was 63464), which QEMU never
        popped (its last_avail_idx and shadow stayed 63464): a lost kick.  With an ioeventfd
        the kick is an eventfd that QEMU's main loop must notice; without one, the vCPU thread
        that writes the notify register runs the queue handler itself."""
        # multidevs=remap: "/" spans several file systems; keep inode numbers unique.
        fs = f"local,id=fs{i},path={self.path},security_model=none,multidevs=remap"
        return ["-fsdev", fs + (",readonly=on" if self.readonly else ""),
                "-device", f"virtio-9p-pci,fsdev=fs{i},mount_tag={self.tag},ioeventfd=off"]


@dataclass(frozen=True)
class SerialPort:
    """A UART of the emulated machine that a slice can use as its console."""

    name: str
    kind: str  # "isa"; "pci" (on bus 0); "pxb" (behind a root port on its own pxb-pcie root bus)
    log: Path
    iobase: int | None = None
    irq: int | None = None
    pci_address: str | None = None
    root_bus: str | None = None  # "0000:20": the root bus the UART is under (PCI kinds)
    pxb_slot: int | None = None  # the pxb-pcie host bridge's slot on bus 0 (kind "pxb")
    numa_node: int | None = None  # the pxb's NUMA node (needs -numa on the command line)

    @property
    def bus_nr(self) -> int | None:
        return int(self.root_bus.split(":")[1], 16) if self.root_bus else None

    @property
    def console_arg(self) -> str:
        """The ``coreslice boot --console`` value: ``io:PORT`` or the PCI address."""
        return f"io:{self.iobase:#x}" if self.iobase is not None else self.pci_address  # type: ignore[return-value]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "iobase": None if self.iobase is None else f"{self.iobase:#x}",
            "irq": self.irq,
            "pci_address": self.pci_address,
            "root_bus": self.root_bus,
            "root_port": f"{self.root_bus}:00.0" if self.kind == "pxb" else None,
            "numa_node": self.numa_node,
            "console_arg": self.console_arg,
            "log": str(self.log),
        }


def slice_serial_ports(logdir: Path, pxb_numa_nodes: Sequence[int] = ()) -> list[SerialPort]:
    """The slice UARTs, ISA first, then the bus-0 PCI UART, then one per pxb root bus.
    ``pxb_numa_nodes`` spreads the pxbs over NUMA nodes (pxb i on ``nodes[i % len]``)."""
    ports = [
        SerialPort(name, "isa", logdir / f"console-{name}.log", iobase=io, irq=irq)
        for name, io, irq in ISA_SLICE_UARTS
    ]
    ports.append(SerialPort("pci", "pci", logdir / "console-pci.log", pci_address=PCI_SERIAL_ADDRESS,
                            root_bus="0000:00"))
    for i, (name, bus, slot) in enumerate(PXB_SLICE_UARTS):
        node = pxb_numa_nodes[i % len(pxb_numa_nodes)] if pxb_numa_nodes else None
        ports.append(SerialPort(name, "pxb", logdir / f"console-{name}.log",
                                pci_address=f"0000:{bus + 1:02x}:00.0", root_bus=f"0000:{bus:02x}",
                                pxb_slot=slot, numa_node=node))
    return ports


def _serial_devices(port: SerialPort, chardev: str) -> list[str]:
    """``-device`` values for one slice UART."""
    if port.kind == "isa":
        return [f"isa-serial,chardev={chardev},iobase={port.iobase:#x},irq={port.irq}"]
    if port.kind == "pci":
        slot = int(port.pci_address.split(":")[2].split(".")[0], 16)  # type: ignore[union-attr]
        return [f"pci-serial,chardev={chardev},bus=pcie.0,addr={slot:#x}"]
    # pxb-pcie takes only bridges: root bus N -> root port N:00.0 -> UART (N+1):00.0.
    # chassis = the root bus number: unique per root port, clear of small numbers others use.
    pxb, rp = port.name, f"{port.name}rp"
    numa = f",numa_node={port.numa_node}" if port.numa_node is not None else ""
    return [
        f"pxb-pcie,id={pxb},bus_nr={port.bus_nr:#x},bus=pcie.0,addr={port.pxb_slot:#x}{numa}",
        f"pcie-root-port,id={rp},bus={pxb},chassis={port.bus_nr:#x},slot=0,addr=0x0",
        f"pci-serial,chardev={chardev},bus={rp},addr=0x0",
    ]


# The IOMMU of --iommu: DMA remapping only.  intremap=off: with remapping on, Linux clears the
# Compatibility Format Interrupt bit (VT-d spec 9.4, GSTS.CFIS), which blocks the
# compatibility-format MSIs the slices' devices send.
IOMMU_DEVICE = "intel-iommu,intremap=off"
X2APIC_IOMMU_DEVICE = "intel-iommu,intremap=on,eim=on"


def check_iommu_apic(x2apic: bool, iommu: bool) -> None:
    """--iommu and --x2apic exclude each other (x2APIC needs interrupt remapping)."""
    if x2apic and iommu:
        raise UsageError("--iommu with --x2apic: x2APIC needs interrupt remapping, which blocks the "
                         "slices' compatibility-format MSIs; drop one of them")


def host_append(host_mem: str = "1G", x2apic: bool = False, extra: Sequence[str] = (),
                iommu: bool = False) -> str:
    """The emulated host's kernel command line.

    ``maxcpus=1 mem=`` leave CPUs and RAM for slices; ``panic=-1`` + QEMU ``-no-reboot`` make a
    panic end the run; ``intel_iommu=off`` (never ``intremap=off``: x2APIC needs interrupt
    remapping) keeps DMA untranslated in x2APIC mode; with ``iommu`` the host translates DMA
    (``intel_iommu=on``) without interrupt remapping (``intremap=off``).
    """
    check_iommu_apic(x2apic, iommu)
    parts = [
        "console=ttyS0,115200",
        "maxcpus=1",
        f"mem={check_size(host_mem, '--host-mem')}",
        "panic=-1",
        "loglevel=6",
        "memory_corruption_check=0",
    ]
    if x2apic:
        parts.append("intel_iommu=off")
    if iommu:
        parts += ["intel_iommu=on", "intremap=off"]
    parts.extend(extra)
    return " ".join(parts)


@dataclass
class MachineConfig:
    kernel: Path
    append: str
    initrd: Path | None = None
    smp: int = 4
    memory: str = "6G"
    cpu_model: str = "max"
    x2apic: bool = False  # adds the interrupt-remapping IOMMU
    iommu: bool = False  # adds a DMA-remapping IOMMU without interrupt remapping (not with x2apic)
    shares: tuple[Share, ...] = ()
    slice_consoles: bool = True
    pxb_numa_nodes: tuple[int, ...] = ()  # NUMA node of each pxb root bus (needs -numa args)
    numa: int = 0  # NUMA nodes (0: no -numa, no SRAT); see numa_args()
    qemu_binary: str = QEMU
    extra_args: tuple[str, ...] = ()
    name: str = "coreslice-host"
    # QEMU's trace log (testbed/audit.py): the file is opened at start, events go on over the monitor.
    trace_file: Path | None = None


def numa_args(nodes: int, smp: int, memory: str) -> list[str]:
    """``-numa`` options that split the machine into ``nodes`` NUMA nodes, which gives it an
    ACPI SRAT: contiguous CPU ranges (the first nodes get one more when ``smp`` does not
    divide) and equal slices of RAM in address order (the last gets the rest), so with
    ``-smp 4 -m 6G`` and 2 nodes: CPUs 0-1 + the first 3 GiB, CPUs 2-3 + the rest."""
    if nodes == 0:
        return []
    if not 1 <= nodes <= smp:
        raise UsageError(f"--numa {nodes}: give between 1 and --smp ({smp}) nodes, or 0 for none")
    mib = size_bytes(memory) >> 20
    if mib < nodes:
        raise UsageError(f"--numa {nodes}: --memory {memory} is too small to split")
    args, cpu = [], 0
    for i in range(nodes):
        ncpus = smp // nodes + (1 if i < smp % nodes else 0)
        size = mib // nodes if i < nodes - 1 else mib - (mib // nodes) * (nodes - 1)
        args += ["-object", f"memory-backend-ram,id=ram-node{i},size={size}M",
                 "-numa", f"node,nodeid={i},cpus={cpu}-{cpu + ncpus - 1},memdev=ram-node{i}"]
        cpu += ncpus
    return args


def build_command(config: MachineConfig, console_log: Path, serial_ports: Sequence[SerialPort]) -> list[str]:
    """The full QEMU command line (pure function of its inputs)."""
    if config.smp < 1:
        raise UsageError(f"--smp {config.smp}: give at least 1 CPU")
    cmd = [
        config.qemu_binary,
        "-name", config.name,
        # Under TCG the intel-iommu's interrupt remapping needs no kernel-irqchip=split
        # (that is a KVM requirement); plain q35 boots the host in x2APIC mode.
        "-machine", "q35",
        "-accel", "tcg",
        "-cpu", config.cpu_model,
        "-smp", str(config.smp),
        "-m", check_size(config.memory, "--memory"),
        *numa_args(config.numa, config.smp, config.memory),
        "-nodefaults",
        "-display", "none",
        "-no-reboot",
        "-chardev", f"file,id=con0,path={console_log}",
        "-serial", "chardev:con0",
    ]
    # The IOMMU before any PCI device (QEMU wants it created first).
    check_iommu_apic(config.x2apic, config.iommu)
    if config.x2apic:
        cmd += ["-device", X2APIC_IOMMU_DEVICE]
    elif config.iommu:
        cmd += ["-device", IOMMU_DEVICE]
    cmd += ["-kernel", str(config.kernel)]
    if config.initrd is not None:
        cmd += ["-initrd", str(config.initrd)]
    cmd += ["-append", config.append]
    for i, share in enumerate(config.shares):
        cmd += share.args(i)
    for i, port in enumerate(serial_ports):
        cid = f"slicecon{i}"
        cmd += ["-chardev", f"file,id={cid},path={port.log}"]
        for dev in _serial_devices(port, cid):
            cmd += ["-device", dev]
    if config.trace_file is not None:
        cmd += ["-trace", f"file={config.trace_file}"]
    cmd += list(config.extra_args)
    return cmd


