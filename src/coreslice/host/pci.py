"""PCI discovery: the host's root complexes, their windows, and the functions behind them.

Read-only, into plain records.  Sources, best first (DESIGN.md §2):

1. the kernel log's "root bus resource" lines (dmesg.py), which are the host bridges' _CRS as
   the kernel decoded it (ACPI 6.5 §6.4.3.5, PCI Firmware Spec 3.3 §4.1);
2. when the log has rotated: the top-level "PCI Bus SSSS:BB" entries of /proc/iomem and
   /proc/ioports (the same windows, as the kernel claimed them) and the host bridges
   /sys/devices/pciSSSS:BB; the bus range then runs from the root bus number to the highest
   bus found below that bridge in sysfs, since nothing else records the _CRS bus range.

Functions come from /sys/bus/pci/devices (class, vendor, device, driver, SR-IOV), or, with no
sysfs (a saved dmesg), from the log's "pci SSSS:BB:DD.F: [vvvv:dddd] ... class" lines.  A
function belongs to the root whose pciSSSS:BB directory its sysfs path passes through, else to the
root of its segment whose bus range contains its bus.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from coreslice.acpi.dsdt import PciRoot
from coreslice.acpi.tables import McfgAllocation
from coreslice.host import dmesg, memory
from coreslice.host.sysfs import link_name, read_text

_4G = 1 << 32
SOURCE_LOG = "kernel log (root bus resource lines)"
SOURCE_SYSFS = "/proc/iomem, /proc/ioports and /sys/devices/pci* (kernel log has no root bus lines)"
SOURCE_NONE = "none (no root bus lines in the kernel log, no PCI host bridge in /proc or /sys)"
_HOST_BRIDGE_DIR = re.compile(r"^pci([0-9a-f]{4,}):([0-9a-f]{2})$")
_PCI_BUS_NAME = re.compile(r"^PCI Bus ([0-9a-f]{4,}):([0-9a-f]{2})$")
_ADDRESS = re.compile(r"^([0-9a-f]{4,}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$")
# PCI Code and ID Assignment Specification 1.x §1.7: base class 06h = bridge device.
BRIDGE_BASE_CLASS = 0x06


@dataclass(frozen=True)
class Window:
    """An I/O or memory range of a root complex, inclusive as the kernel prints it."""

    kind: str                 # "io" or "mem"
    start: int
    end: int
    window: bool = True       # False: a range the bridge itself consumes (no "window" flag)
    prefetchable: bool = False
    offset: int = 0           # CPU address - bus address (0 on x86)

    @property
    def above_4g(self) -> bool:
        return self.kind == "mem" and self.end >= _4G

    def to_json(self) -> dict:
        return {"kind": self.kind, "start": self.start, "end": self.end, "window": self.window,
                "prefetchable": self.prefetchable, "offset": self.offset}

    def __str__(self) -> str:
        flags = " pref" if self.prefetchable else ""
        return f"{self.kind} 0x{self.start:x}-0x{self.end:x}{flags}{'' if self.window else ' (consumed)'}"


@dataclass(frozen=True)
class RootComplex:
    """One PCI host bridge: a segment, the bus range behind it, its windows."""

    segment: int
    bus_start: int
    bus_end: int
    resources: tuple[Window, ...] = ()
    acpi_name: str | None = None   # e.g. "PC02", when the log names it
    numa_node: int | None = None   # from the log's "on NUMA node" line

    @property
    def name(self) -> str:
        return f"{self.segment:04x}:{self.bus_start:02x}"

    @property
    def io(self) -> list[Window]:
        return [w for w in self.resources if w.kind == "io" and w.window]

    @property
    def mem_below_4g(self) -> list[Window]:
        return [w for w in self.resources if w.kind == "mem" and w.window and not w.above_4g]

    @property
    def mem_above_4g(self) -> list[Window]:
        return [w for w in self.resources if w.kind == "mem" and w.window and w.above_4g]

    @property
    def consumed(self) -> list[Window]:
        return [w for w in self.resources if not w.window]

    def holds_bus(self, segment: int, bus: int) -> bool:
        return segment == self.segment and self.bus_start <= bus <= self.bus_end

    def dsdt_root(self) -> PciRoot:
        """The windows a slice's DSDT lists for this root (acpi/dsdt.py).  Consumed ranges stay
        out: a root's _CRS producer descriptors are the windows (PCI Firmware Spec 3.3 §4.1.4)."""
        translated = [w for w in self.io + self.mem_below_4g + self.mem_above_4g if w.offset]
        if translated:
            raise ValueError(f"root {self.name} window {translated[0]} is translated (CPU address differs "
                             "from bus address), which x86 slices do not support")
        return PciRoot(bus_start=self.bus_start, bus_end=self.bus_end, segment=self.segment,
                       io=tuple((w.start, w.end) for w in self.io),
                       mem=tuple((w.start, w.end) for w in self.mem_below_4g + self.mem_above_4g))

    def to_json(self) -> dict:
        return {
            "name": self.name, "segment": self.segment, "bus_start": self.bus_start,
            "bus_end": self.bus_end, "acpi_name": self.acpi_name, "numa_node": self.numa_node,
            "io": [w.to_json() for w in self.io],
            "mem_below_4g": [w.to_json() for w in self.mem_below_4g],
            "mem_above_4g": [w.to_json() for w in self.mem_above_4g],
            "consumed": [w.to_json() for w in self.consumed],
        }


@dataclass(frozen=True)
class Function:
    """A PCI function as sysfs (or the kernel log) describes it."""

    address: str                     # "0000:3d:00.0"
    class_code: int | None
    vendor: int | None = None
    device: int | None = None
    driver: str | None = None
    root: str | None = None          # RootComplex.name, or None when under no known root
    sriov_totalvfs: int | None = None  # present on SR-IOV physical functions
    sriov_numvfs: int | None = None
    physfn: str | None = None        # set on virtual functions: their physical function
    numa_node: int | None = None     # sysfs numa_node (None for -1: the firmware gave no _PXM)
    iommu_group: int | None = None   # sysfs iommu_group (None: the host's IOMMU does not translate)

    @property
    def segment(self) -> int:
        return int(self.address[:-8], 16)

    @property
    def bus(self) -> int:
        return int(self.address[-7:-5], 16)

    @property
    def is_bridge(self) -> bool:
        return self.class_code is not None and self.class_code >> 16 == BRIDGE_BASE_CLASS

    def to_json(self) -> dict:
        return {"address": self.address, "class": self.class_code, "vendor": self.vendor,
                "device": self.device, "driver": self.driver, "root": self.root,
                "sriov_totalvfs": self.sriov_totalvfs, "sriov_numvfs": self.sriov_numvfs,
                "physfn": self.physfn, "numa_node": self.numa_node, "iommu_group": self.iommu_group}


# Drivers that may stay on other members of a function's IOMMU group: they leave the group's DMA
# ownership to whoever claims it (struct device_driver's driver_managed_dma: pcieport, pci-stub;
# and vfio-pci itself), so VFIO can still take the group.
GROUP_NEUTRAL_DRIVERS = {"pcieport", "pci-stub", "vfio-pci"}


@dataclass
class PciTopology:
    roots: list[RootComplex] = field(default_factory=list)
    functions: list[Function] = field(default_factory=list)
    source: str = SOURCE_NONE
    # ECAM regions the kernel log reports (MMCONFIG/ECAM lines): the MCFG when only a log is known.
    ecam_from_log: list[McfgAllocation] = field(default_factory=list)
    # False when functions were taken from a log that lists none (a grep of root bus lines).
    functions_known: bool = True

    def root(self, name: str) -> RootComplex | None:
        return next((r for r in self.roots if r.name == name), None)

    def function(self, address: str) -> Function | None:
        return next((f for f in self.functions if f.address == address), None)

    def root_of_bus(self, segment: int, bus: int) -> RootComplex | None:
        return next((r for r in self.roots if r.holds_bus(segment, bus)), None)

    def functions_under(self, root: RootComplex) -> list[Function]:
        return [f for f in self.functions if f.root == root.name]

    def group_mates_in_use(self, group: int, given: set[str]) -> str | None:
        """The endpoints of IOMMU group ``group`` outside ``given`` that a host driver holds (a
        DMA user: pcieport, pci-stub and vfio-pci are not), named for a message; None if none."""
        others = [f for f in self.functions if f.iommu_group == group and f.address not in given
                  and not f.is_bridge and f.driver not in GROUP_NEUTRAL_DRIVERS]
        if not others:
            return None
        return ", ".join(f"{f.address} ({'driver ' + f.driver if f.driver else 'no driver'})" for f in others)

    def to_json(self) -> dict:
        return {"source": self.source, "roots": [r.to_json() for r in self.roots],
                "functions": [f.to_json() for f in self.functions],
                "functions_known": self.functions_known,
                "ecam_from_log": [vars(a) for a in self.ecam_from_log]}


# ---------------------------------------------------------------------------------------------
# Roots

def roots_from_log(log: dmesg.LogPci) -> list[RootComplex]:
    out = []
    for r in log.roots:
        res = tuple(Window(x.kind, x.start, x.end, x.window or not log.marks_windows, x.prefetchable, x.offset)
                    for x in r.resources)
        # No [bus] line: the kernel then uses the root bus up to 0xff ("No busn resource found").
        out.append(RootComplex(r.segment, r.bus, r.bus_end if r.bus_end is not None else 0xFF,
                               res, r.acpi_name, r.numa_node))
    return out


def _pci_bus_windows(root: Path, rel: str, kind: str) -> dict[tuple[int, int], list[Window]]:
    out: dict[tuple[int, int], list[Window]] = {}
    for r in memory.parse_iomem(read_text(root, rel, "") or "", root, rel):
        m = _PCI_BUS_NAME.match(r.type)
        if m and r.end > r.start + 1:  # all zeros when read without CAP_SYS_ADMIN
            out.setdefault((int(m.group(1), 16), int(m.group(2), 16)), []).append(Window(kind, r.start, r.end - 1))
    return out


def _max_bus_below(bridge_dir: Path) -> int | None:
    """Highest bus number below a host bridge directory: of any function, and of any bridge's
    subordinate bus (functions sit in nested directories, one level per bridge)."""
    best = None
    todo = [bridge_dir]
    while todo:
        for dev in todo.pop().iterdir():
            m = _ADDRESS.match(dev.name)
            if not m or dev.is_symlink() or not dev.is_dir():
                continue
            sub = read_text(dev, "subordinate_bus_number")
            buses = [int(m.group(2), 16)] + ([int(sub)] if sub is not None and sub.isdigit() else [])
            best = max(buses + ([best] if best is not None else []))
            todo.append(dev)
    return best


def roots_from_sysfs(root: Path) -> list[RootComplex]:
    """The fallback: windows from /proc/iomem + /proc/ioports, buses from /sys/devices/pci*."""
    windows: dict[tuple[int, int], list[Window]] = {}
    for rel, kind in (("proc/ioports", "io"), ("proc/iomem", "mem")):
        for key, ws in _pci_bus_windows(root, rel, kind).items():
            windows.setdefault(key, []).extend(ws)
    bridges: dict[tuple[int, int], Path] = {}
    devices = root / "sys/devices"
    if devices.is_dir():
        for d in devices.iterdir():
            m = _HOST_BRIDGE_DIR.match(d.name)
            if m:
                bridges[(int(m.group(1), 16), int(m.group(2), 16))] = d
    out = []
    for seg, bus in sorted(set(windows) | set(bridges)):
        top = _max_bus_below(bridges[(seg, bus)]) if (seg, bus) in bridges else None
        out.append(RootComplex(seg, bus, max(bus, top if top is not None else bus),
                               tuple(windows.get((seg, bus), []))))
    return out


# ---------------------------------------------------------------------------------------------
# Functions

def _int(text: str | None, base: int = 16) -> int | None:
    try:
        return int(text, base) if text is not None else None
    except ValueError:
        return None


def _root_from_path(real: Path) -> str | None:
    for part in real.parts:
        m = _HOST_BRIDGE_DIR.match(part)
        if m:
            return f"{m.group(1)}:{m.group(2)}"
    return None


def functions_from_sysfs(root: Path, roots: list[RootComplex]) -> list[Function]:
    base = root / "sys/bus/pci/devices"
    if not base.is_dir():
        return []
    topo = PciTopology(roots)
    out = []
    for link in sorted(base.iterdir()):
        if not _ADDRESS.match(link.name):
            continue
        # os.path.realpath, not Path.resolve: a symlink loop in a damaged tree raises in resolve
        d, top = Path(os.path.realpath(link)), Path(os.path.realpath(root))
        owner = _root_from_path(d.relative_to(top) if d.is_relative_to(top) else d)
        if owner is None or topo.root(owner) is None:
            by_bus = topo.root_of_bus(int(link.name[:-8], 16), int(link.name[-7:-5], 16))
            owner = by_bus.name if by_bus else owner
        physfn = link / "physfn"
        out.append(Function(
            address=link.name,
            class_code=_int(read_text(link, "class")),
            vendor=_int(read_text(link, "vendor")),
            device=_int(read_text(link, "device")),
            driver=link_name(link / "driver"),
            root=owner,
            sriov_totalvfs=_int(read_text(link, "sriov_totalvfs"), 10),
            sriov_numvfs=_int(read_text(link, "sriov_numvfs"), 10),
            physfn=os.path.basename(os.path.realpath(physfn)) if physfn.exists() else None,
            numa_node=node if (node := _int(read_text(link, "numa_node"), 10)) is not None and node >= 0 else None,
            iommu_group=_int(link_name(link / "iommu_group"), 10),
        ))
    return out


def functions_from_log(log: dmesg.LogPci, roots: list[RootComplex]) -> list[Function]:
    topo = PciTopology(roots)
    out = []
    for f in log.functions:
        seg, bus = int(f.address[:-8], 16), int(f.address[-7:-5], 16)
        owner = topo.root_of_bus(seg, bus)
        out.append(Function(f.address, f.class_code, f.vendor, f.device, None,
                            owner.name if owner else None, sriov_totalvfs=f.sriov_totalvfs))
    return out


# ---------------------------------------------------------------------------------------------

def from_log(lines: list[str]) -> PciTopology:
    """What a kernel log alone says (``--from-dmesg FILE`` without a host tree)."""
    log = dmesg.parse_log(lines)
    roots = roots_from_log(log)
    return PciTopology(roots, functions_from_log(log, roots), SOURCE_LOG if roots else SOURCE_NONE,
                       log.ecam, functions_known=bool(log.functions))


def read_pci(root: Path, log_lines: list[str]) -> PciTopology:
    """The host's PCI topology: roots from the log, else from /proc and /sys; functions from /sys."""
    log = dmesg.parse_log(log_lines)
    roots, source = roots_from_log(log), SOURCE_LOG
    if not roots:
        roots = roots_from_sysfs(root)
        source = SOURCE_SYSFS if roots else SOURCE_NONE
    functions = functions_from_sysfs(root, roots)
    known = True
    if not functions and not (root / "sys/bus/pci/devices").is_dir():
        functions, known = functions_from_log(log, roots), bool(log.functions)
    return PciTopology(roots, functions, source, log.ecam, functions_known=known)
