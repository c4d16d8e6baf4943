"""One read-only snapshot of everything the planner needs to know about the host."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from coreslice.acpi.tables import Madt, McfgAllocation, parse_madt, parse_mcfg
from coreslice.errors import UsageError
from coreslice.host import consoles, cpus, memory, numa, pci, platform, storage
from coreslice.host.sysfs import read_acpi_table, read_text


@dataclass
class Host:
    root: Path
    boot_id: str
    cmdline: str
    cpus: list[cpus.HostCpu]
    firmware_map: list[memory.Range]
    iomem: list[memory.Range]
    madt: Madt | None
    mcfg: list[McfgAllocation]
    serial_ports: list[consoles.SerialPort]
    tsc_khz: int | None
    apic_mode: str | None
    apic_mode_source: str
    kernel_log: list[str] = field(repr=False, default_factory=list)
    numa: list[numa.NumaNode] = field(default_factory=list)  # from the SRAT; one node 0 without
    pci: pci.PciTopology = field(default_factory=pci.PciTopology)  # root complexes and functions
    # PCI functions behind the host's mounted file systems and swap (host/storage.py)
    storage_functions: dict[str, list[str]] = field(default_factory=dict)
    lockdown: str | None = None  # kernel lockdown mode (platform.read_lockdown)
    kernel_version: tuple[int, int] | None = None  # the running host kernel's (major, minor)

    @property
    def live(self) -> bool:
        return self.root == Path("/")

    @property
    def boot_cpu(self) -> cpus.HostCpu | None:
        return next((c for c in self.cpus if c.boot), None)

    def firmware_ram(self) -> list[memory.Range]:
        return memory.merge(self.firmware_map, "System RAM")

    def host_ram(self) -> list[memory.Range]:
        return memory.merge(self.iomem, "System RAM")

    def to_json(self) -> dict:
        return {
            "boot_id": self.boot_id,
            "cmdline": self.cmdline,
            "cpus": [c.to_json() for c in self.cpus],
            "firmware_map": [r.to_json() for r in self.firmware_map],
            "host_ram": [r.to_json() for r in self.host_ram()],
            "tsc_khz": self.tsc_khz,
            "apic_mode": self.apic_mode,
            "apic_mode_source": self.apic_mode_source,
            "numa": [n.to_json() for n in self.numa],
            "pci": self.pci.to_json(),
        }


def root_problem(root: Path | str) -> str | None:
    """Why ``root`` cannot be a host tree, or None.  Without this, a mistyped tree reads as a
    host with no files: one CPU, no memory, nothing to refuse."""
    root = Path(root)
    try:
        if root.is_dir():
            # Every Linux host and every capture (scripts/capture-host.sh) has this file: a
            # folder without it (an empty one, the wrong level of a tree) is no host tree.
            if root != Path("/") and not (root / "sys/devices/system/cpu/present").exists():
                return "holds no sys/devices/system/cpu/present, so it is no captured host tree"
            return None
        if root.is_symlink() and not root.exists():
            return "a symlink to nothing (or a loop)"
        return "not a directory" if root.exists() else "no such directory"
    except OSError as e:  # e.g. a symlink loop on an older Python
        return e.strerror or str(e)


def check_root(root: Path | str, what: str = "host root") -> Path:
    problem = root_problem(root)
    if problem is not None:
        raise UsageError(f"{what} {root}: {problem}; pass a captured host tree (scripts/capture-host.sh), "
                         "or / for this host")
    return Path(root)


def discover(root: Path | str = "/") -> Host:
    root = check_root(root)
    madt = read_acpi_table(root, "APIC", parse_madt)
    log = platform.read_kernel_log(root)
    mode, source = platform.read_apic_mode(root, log)
    srat = numa.read_srat(root)
    host = Host(
        root=root,
        boot_id=platform.read_boot_id(root),
        cmdline=read_text(root, "proc/cmdline", "") or "",
        cpus=cpus.read_cpus(root, madt, numa.apic_nodes(srat)),
        firmware_map=memory.read_firmware_map(root),
        iomem=memory.read_iomem(root),
        madt=madt,
        mcfg=read_acpi_table(root, "MCFG", parse_mcfg) or [],
        serial_ports=consoles.read_serial_ports(root),
        tsc_khz=platform.tsc_khz_from_log(log),
        apic_mode=mode,
        apic_mode_source=source,
        kernel_log=log,
        pci=pci.read_pci(root, log),
        storage_functions=storage.host_storage_functions(root),
        lockdown=platform.read_lockdown(root),
        kernel_version=platform.kernel_version(root, log),
    )
    host.numa = numa.build_nodes(srat, host.cpus, host.firmware_ram(), host.host_ram())
    return host
