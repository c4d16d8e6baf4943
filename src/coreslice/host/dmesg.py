"""PCI facts in the kernel log: root bus resources, host bridges, functions, ECAM regions.

The lines come from /dev/kmsg (platform.read_kernel_log) or from a saved ``dmesg`` output, with or
without timestamps (``[    1.653026] ...``, ``dmesg -x`` level prefixes, syslog prefixes): each
pattern is searched anywhere in a line.  The kernel prints (drivers/pci/probe.c,
drivers/acpi/pci_root.c, arch/x86/pci/mmconfig-shared.c; %pR format, lib/vsprintf.c):

    ACPI: PCI Root Bridge [PC02] (domain 0000 [bus 3a-5c])
    PCI host bridge to bus 0000:3a
    pci_bus 0000:3a: root bus resource [io  0x6000-0x7fff window]
    pci_bus 0000:3a: root bus resource [mem 0x388000000000-0x38bfffffffff window]
    pci_bus 0000:3a: root bus resource [bus 3a-5c]
    pci_bus 0000:3a: on NUMA node 0
    pci 0000:3d:00.0: [144d:a808] type 00 class 0x010802
    PCI: MMCONFIG for domain 0000 [bus 00-ff] at [mem 0x80000000-0x8fffffff] (base 0x80000000)
    PCI: ECAM [mem 0xb0000000-0xbfffffff] (base 0xb0000000) for domain 0000 [bus 00-ff]   (6.x)

Only parsing here; pci.py turns the records into the host's PCI topology.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from coreslice.acpi.tables import McfgAllocation

_HEX = "[0-9a-fA-F]"
_ROOT_RESOURCE = re.compile(
    rf"pci_bus ({_HEX}{{4,}}):({_HEX}{{2}}): root bus resource \[(\w+)\s+([^\]]*)\](.*)")
_BUS_RANGE = re.compile(rf"^({_HEX}{{2}})(?:-({_HEX}{{2}}))?$")
_ADDR_RANGE = re.compile(r"^(0x[0-9a-fA-F]+)-(0x[0-9a-fA-F]+)((?:\s+\w+)*)$")
_BUS_ADDRESS = re.compile(r"\(bus address \[(0x[0-9a-fA-F]+)-(0x[0-9a-fA-F]+)\]\)")
_HOST_BRIDGE = re.compile(rf"PCI host bridge to bus ({_HEX}{{4,}}):({_HEX}{{2}})")
_ACPI_ROOT = re.compile(rf"PCI Root Bridge \[(\w+)\] \(domain ({_HEX}{{4,}}) \[bus ({_HEX}{{2}})")
_NUMA = re.compile(rf"pci_bus ({_HEX}{{4,}}):({_HEX}{{2}}): on NUMA node (\d+)")
_FUNCTION = re.compile(
    rf"pci ({_HEX}{{4,}}:{_HEX}{{2}}:{_HEX}{{2}}\.[0-7]): \[({_HEX}{{4}}):({_HEX}{{4}})\] type "
    rf"({_HEX}{{2}}) class 0x({_HEX}{{6}})")
# The kernel sizes VF BARs for TotalVFs (drivers/pci/iov.c): "... (contains BAR0 for 64 VFs)".
_SRIOV = re.compile(rf"pci ({_HEX}{{4,}}:{_HEX}{{2}}:{_HEX}{{2}}\.[0-7]): VF\(n\) BAR\d space.*for (\d+) VFs")
_MMCONFIG = re.compile(
    rf"MMCONFIG for (?:domain|segment) ({_HEX}{{4,}}) \[bus ({_HEX}{{2}})-({_HEX}{{2}})\] "
    r"at \[mem 0x[0-9a-fA-F]+-0x[0-9a-fA-F]+\] \(base (0x[0-9a-fA-F]+)\)")
_ECAM = re.compile(
    rf"PCI: ECAM \[mem 0x[0-9a-fA-F]+-0x[0-9a-fA-F]+\] \(base (0x[0-9a-fA-F]+)\) for domain "
    rf"({_HEX}{{4,}}) \[bus ({_HEX}{{2}})-({_HEX}{{2}})\]")


@dataclass(frozen=True)
class LogResource:
    """One "root bus resource" line: an I/O or memory range, inclusive, in CPU addresses."""

    kind: str            # "io" or "mem"
    start: int
    end: int
    window: bool         # printed with "window": a range the bridge forwards (a _CRS producer)
    prefetchable: bool = False
    offset: int = 0      # CPU address - bus address, when the kernel printed "(bus address [...])"


@dataclass
class LogRoot:
    """Everything the log says about one root bus, keyed by segment and root bus number."""

    segment: int
    bus: int
    bus_end: int | None = None       # from "[bus 3a-5c]"; None if no such line
    resources: list[LogResource] = field(default_factory=list)
    acpi_name: str | None = None
    numa_node: int | None = None


@dataclass(frozen=True)
class LogFunction:
    address: str         # "0000:3d:00.0"
    vendor: int
    device: int
    header_type: int
    class_code: int
    sriov_totalvfs: int | None = None  # from the VF BAR lines of an SR-IOV physical function


@dataclass
class LogPci:
    roots: list[LogRoot]
    functions: list[LogFunction]
    ecam: list[McfgAllocation]
    # Whether this kernel marks bridge windows at all ("window" after the range).  Kernels before
    # about 4.3 printed no flag on x86, so there every root bus resource is a window.
    marks_windows: bool


def _resource(kind: str, text: str, rest: str) -> LogResource | None:
    m = _ADDR_RANGE.match(text.strip())
    if not m:
        return None
    start, end, flags = int(m.group(1), 16), int(m.group(2), 16), m.group(3).split()
    offset = 0
    b = _BUS_ADDRESS.search(rest)
    if b:
        offset = start - int(b.group(1), 16)
    return LogResource(kind, start, end, "window" in flags, "pref" in flags, offset)


def parse_log(lines: list[str]) -> LogPci:
    roots: dict[tuple[int, int], LogRoot] = {}
    names: dict[tuple[int, int], str] = {}
    nodes: dict[tuple[int, int], int] = {}  # "on NUMA node" also names child buses: kept aside
    functions: dict[str, LogFunction] = {}
    sriov: dict[str, int] = {}
    ecam: list[McfgAllocation] = []
    marks_windows = False

    def root(seg: str, bus: str) -> LogRoot:
        key = (int(seg, 16), int(bus, 16))
        return roots.setdefault(key, LogRoot(*key))

    for line in lines:
        if "pci" not in line.lower():
            continue
        if m := _ROOT_RESOURCE.search(line):
            seg, bus, kind, text, rest = m.groups()
            r = root(seg, bus)
            if kind == "bus":
                b = _BUS_RANGE.match(text.strip())
                if b:
                    r.bus_end = int(b.group(2) or b.group(1), 16)
            elif kind in ("io", "mem"):
                res = _resource(kind, text, rest)
                if res is not None:
                    marks_windows |= res.window
                    if res not in r.resources:  # a log read twice repeats its lines
                        r.resources.append(res)
        elif m := _HOST_BRIDGE.search(line):
            root(*m.groups())
        elif m := _ACPI_ROOT.search(line):
            names[(int(m.group(2), 16), int(m.group(3), 16))] = m.group(1)
        elif m := _NUMA.search(line):
            nodes[(int(m.group(1), 16), int(m.group(2), 16))] = int(m.group(3))
        elif m := _FUNCTION.search(line):
            addr = m.group(1).lower()
            functions.setdefault(addr, LogFunction(addr, int(m.group(2), 16), int(m.group(3), 16),
                                                   int(m.group(4), 16), int(m.group(5), 16)))
        elif m := _SRIOV.search(line):
            sriov[m.group(1).lower()] = int(m.group(2))
        elif m := _MMCONFIG.search(line):
            seg, start, end, base = m.groups()
            _add_ecam(ecam, McfgAllocation(int(base, 16), int(seg, 16), int(start, 16), int(end, 16)))
        elif m := _ECAM.search(line):
            base, seg, start, end = m.groups()
            _add_ecam(ecam, McfgAllocation(int(base, 16), int(seg, 16), int(start, 16), int(end, 16)))
    for key, r in roots.items():
        r.acpi_name = names.get(key)
        r.numa_node = nodes.get(key)
    funcs = [LogFunction(f.address, f.vendor, f.device, f.header_type, f.class_code, sriov.get(f.address))
             for f in functions.values()]
    return LogPci(sorted(roots.values(), key=lambda r: (r.segment, r.bus)),
                  sorted(funcs, key=lambda f: f.address), ecam, marks_windows)


def _add_ecam(ecam: list[McfgAllocation], a: McfgAllocation) -> None:
    if a not in ecam:
        ecam.append(a)
