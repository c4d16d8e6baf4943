"""The PCI part of a plan: which functions a slice gets, which root complexes it sees, its ECAM.

A slice with PCI functions runs the kernel's PCI core on the root complexes that hold them, and
only on those: its DSDT lists exactly these roots (acpi/dsdt.py), and its command line keeps the
kernel from reassigning anything (plan.slice_cmdline).  It reaches their configuration space
through ECAM, never through port 0xCF8, which the host uses: Linux accepts an MCFG region only if
the e820 map marks it reserved (arch/x86/pci/mmconfig-shared.c, is_mmconf_reserved checks from the
region's first bus on), so the slice's MCFG is cut down to the assigned roots' buses and each of
those ranges is reserved in its e820 map.

Every check raises UsageError with one line naming the function, the problem and the fix.  Pure:
reads only the Host snapshot (and consoles.pci_console_ttys for the host's console).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from coreslice.acpi.dsdt import PciRoot
from coreslice.acpi.tables import McfgAllocation
from coreslice.errors import UsageError
from coreslice.host import consoles
from coreslice.host.pci import Function, PciTopology, RootComplex

ECAM_BUS_SIZE = 1 << 20  # PCI Firmware Spec 3.3 §4.1.2: 4 KiB x 32 devices x 8 functions per bus


def normalize(text: str, what: str = "device") -> str:
    addr = consoles.normalize_pci_address(text)
    if addr is None:
        raise UsageError(f"{what} '{text}' is not a PCI address; write it as SEGMENT:BUS:DEVICE.FUNCTION, e.g. 0000:3b:00.0")
    return addr


def _bus(addr: str) -> tuple[int, int]:
    return int(addr[:-8], 16), int(addr[-7:-5], 16)


def _known_roots(topo: PciTopology) -> str:
    if not topo.roots:
        return "none known"
    return "known: " + ", ".join(f"{r.name} buses {r.bus_start:02x}-{r.bus_end:02x}" for r in topo.roots)


def root_of(topo: PciTopology, addr: str, what: str = "device") -> RootComplex:
    """The root complex holding ``addr``; UsageError if the function or its root is unknown."""
    fn = topo.function(addr)
    if fn is None and topo.functions_known:
        raise UsageError(f"{what} {addr}: no such PCI function on this host; "
                         "pass one that 'coreslice host show' lists")
    root = topo.root(fn.root) if fn is not None and fn.root else topo.root_of_bus(*_bus(addr))
    if root is None:
        raise UsageError(f"{what} {addr} is under no known PCI root complex ({_known_roots(topo)}); "
                         "give the host's full kernel log (--from-dmesg FILE with the 'root bus resource' lines)")
    return root


def roots_holding(topo: PciTopology, addresses: Sequence[str], what: str = "device") -> list[RootComplex]:
    """The distinct roots holding ``addresses``, in (segment, bus) order."""
    roots = {r.name: r for r in (root_of(topo, a, what) for a in addresses)}
    return sorted(roots.values(), key=lambda r: (r.segment, r.bus_start))


def dsdt_roots(roots: Sequence[RootComplex]) -> list[PciRoot]:
    try:
        return [r.dsdt_root() for r in roots]
    except ValueError as e:
        raise UsageError(f"{e}; choose a function under another root") from None


@dataclass(frozen=True)
class AssignedFunction:
    address: str
    role: str               # "device" or "console"
    driver: str | None      # the host driver it is unbound from at launch
    root: str               # RootComplex.name

    def to_json(self) -> dict:
        return {"address": self.address, "role": self.role, "driver": self.driver, "root": self.root}


@dataclass(frozen=True)
class PciPlan:
    functions: tuple[AssignedFunction, ...]
    roots: tuple[RootComplex, ...]
    mcfg: tuple[McfgAllocation, ...]      # the host's allocations cut to the roots' buses
    ecam: tuple[tuple[int, int], ...]     # [start, end) of each, reserved in the slice's e820

    @property
    def devices(self) -> list[AssignedFunction]:
        return [f for f in self.functions if f.role == "device"]

    def dsdt_roots(self) -> list[PciRoot]:
        return dsdt_roots(self.roots)

    def to_json(self) -> dict:
        return {
            "functions": [f.to_json() for f in self.functions],
            "roots": [r.to_json() for r in self.roots],
            "mcfg": [vars(a) for a in self.mcfg],
            "ecam_reserved": [{"start": s, "end": e} for s, e in self.ecam],
        }


def _check_device(addr: str, host, seen: set[str], console: str | None) -> Function:
    if addr == console:
        raise UsageError(f"device {addr} is also the --console; give it once, as --console")
    if addr in seen:
        raise UsageError(f"device {addr} is given twice; name each function once")
    fn = host.pci.function(addr)
    if fn is None:
        raise UsageError(f"device {addr}: no such PCI function on this host; "
                         "pass one that 'coreslice host show' lists (see /sys/bus/pci/devices)")
    if fn.is_bridge:
        raise UsageError(f"device {addr} is a bridge (class 0x{fn.class_code:06x}), not a function a slice can drive; "
                         "assign the functions behind it instead")
    ttys = set(consoles.pci_console_ttys(host.root, addr))
    if any(p.in_use_as_console and p.tty in ttys for p in host.serial_ports):
        raise UsageError(f"device {addr} is the host's own console ({', '.join(sorted(ttys))}); choose another function")
    used = host.storage_functions.get(addr)
    if used:
        raise UsageError(f"device {addr} holds the host's own storage (mounted: {', '.join(used)}); "
                         "the slice would reset it under the host: choose another function")
    return fn


def _check_root_alone(root: RootComplex, mine: list[str], topo: PciTopology) -> None:
    """Everything behind an exposed root is visible to the slice: no host driver may own any of it.

    Bridges (root ports, switches) are the path to the functions and stay shared; the slice has
    no _OSC, so it takes none of their PCIe services (dsdt.py).  The physical function of an
    assigned SR-IOV VF stays with the host, which manages its VFs through it; keeping the slice's
    kernel off it is the SR-IOV work's (a later issue)."""
    pfs = {fn.physfn for a in mine if (fn := topo.function(a)) is not None and fn.physfn}
    busy = [f for f in topo.functions_under(root)
            if f.address not in mine and f.address not in pfs and f.driver and not f.is_bridge]
    if busy:
        names = ", ".join(f"{f.address} ({f.driver})" for f in busy[:3]) + (" ..." if len(busy) > 3 else "")
        raise UsageError(f"PCI root {root.name} (buses {root.bus_start:02x}-{root.bus_end:02x}) that holds "
                         f"{', '.join(mine)} also holds {names}, driven by the host; the slice would see and drive them too: "
                         "assign a function under a root of its own, or unbind those from their host drivers first")


def _ecam_for(root: RootComplex, buses: set[int], mcfg: Sequence[McfgAllocation]) -> list[McfgAllocation]:
    """The host's MCFG allocations cut to ``root``'s buses; each assigned bus must be covered."""
    cut = [McfgAllocation(a.base_address, a.segment, max(a.start_bus, root.bus_start), min(a.end_bus, root.bus_end))
           for a in mcfg
           if a.segment == root.segment and a.start_bus <= root.bus_end and root.bus_start <= a.end_bus]
    missing = sorted(b for b in buses if not any(c.start_bus <= b <= c.end_bus for c in cut))
    if missing:
        raise UsageError(f"bus {root.segment:04x}:{missing[0]:02x} (root {root.name}) has no ECAM region in the host's MCFG; "
                         "the slice would reach its configuration space through port 0xCF8, which the host uses: "
                         "choose a function under a root that the MCFG covers")
    return cut




def _check_iommu_groups(given: Sequence[str], topo: PciTopology) -> None:
    """Refuse a function whose IOMMU group it shares with one the host drives.

    An IOMMU domain covers a whole IOMMU group (the functions the IOMMU cannot tell apart, for
    lack of PCIe ACS between them): a group that mixes a slice's function with one the host
    drives can be given to neither alone, so it is refused before anything changes, naming the
    host's members.  The slice's own domain, which maps exactly its RAM, is built at launch
    (launch/dmahold.py)."""
    mine = set(given)
    for addr in given:
        f = topo.function(addr)
        if f is None or f.iommu_group is None:
            continue
        names = topo.group_mates_in_use(f.iommu_group, mine)
        if names:
            raise UsageError(f"PCI function {addr} shares IOMMU group {f.iommu_group} with {names}, which the slice "
                             "is not given: one IOMMU domain covers the whole group; give the slice every function "
                             "of the group (--device), or choose a function in a group of its own")


def plan_pci(devices: Sequence[str], console_address: str | None, host,
             probe_only_permitted: bool = False) -> PciPlan | None:
    """Check the functions given to a slice (``--device`` and a PCI ``--console``) and resolve
    their roots and ECAM ranges; None when there are none.

    ``probe_only_permitted``: the slice kernel probes only the functions its command line permits
    (the prototype's slice kernel, ``pci=...,permit_probe_only=``), so a root may also hold
    functions the host drives; a stock kernel would drive everything it finds there."""
    topo: PciTopology = host.pci
    assigned: list[tuple[str, str]] = []
    seen: set[str] = set()
    if console_address:
        assigned.append((console_address, "console"))
        seen.add(console_address)
    for text in devices:
        addr = normalize(text)
        _check_device(addr, host, seen, console_address)
        seen.add(addr)
        assigned.append((addr, "device"))
    if not assigned:
        return None
    funcs, roots = [], {}
    for addr, role in assigned:
        root = root_of(topo, addr, "console" if role == "console" else "device")
        fn = topo.function(addr)
        funcs.append(AssignedFunction(addr, role, fn.driver if fn else None, root.name))
        roots[root.name] = root
    ordered = sorted(roots.values(), key=lambda r: (r.segment, r.bus_start))
    mcfg: list[McfgAllocation] = []
    for root in ordered:
        mine = [f.address for f in funcs if f.root == root.name]
        if not probe_only_permitted:
            _check_root_alone(root, mine, topo)
        mcfg += _ecam_for(root, {_bus(a)[1] for a in mine}, host.mcfg)
    _check_iommu_groups([a for a, _ in assigned], topo)
    dsdt_roots(ordered)  # a window that cannot be described is refused here, before any write
    ecam: list[tuple[int, int]] = []
    for start, end in sorted((a.base_address + a.start_bus * ECAM_BUS_SIZE, a.base_address + (a.end_bus + 1) * ECAM_BUS_SIZE)
                             for a in mcfg):
        if ecam and ecam[-1][1] >= start:  # adjacent roots: one e820 entry, as the kernel would merge them
            ecam[-1] = (ecam[-1][0], max(ecam[-1][1], end))
        else:
            ecam.append((start, end))
    return PciPlan(tuple(funcs), tuple(ordered), tuple(mcfg), tuple(ecam))
