"""What a slice's CPUs touched: QEMU's device-access trace, split into the slice's own devices
and everything else (``coreslice testbed run --audit``).

QEMU logs every access that reaches a device model (not RAM) as a ``memory_region_ops_read`` or
``memory_region_ops_write`` trace event, with the index of the CPU that made it (-1 for DMA and
the main loop), the region's name and the absolute address (``memory_region_to_absolute_addr``
in QEMU's system/memory.c: an I/O port for the I/O space, a physical address for memory)::

    memory_region_ops_write cpu 1 mr 0x55... addr 0x4d0 value 0x0 size 1 name 'elcr'

The testbed machine is started with ``-trace file=...`` and no event on; the run turns both
events on over the monitor when the first slice boot starts and off after the slices have run
steadily for a while, so the host's own boot is not in the log and the log stays small.

A slice's own resources come from the plan ``coreslice boot --json`` printed for it: its CPUs'
local APICs, the I/O and memory windows of its root buses (where its functions' BARs are), the
ECAM of its buses (its MCFG), and an ISA console port.  Anything else its CPUs reached is
foreign.  CPU index = APIC ID holds for the testbed's flat ``-smp N`` topology (QEMU numbers
x86 CPUs in APIC ID order there); :func:`slice_cpu_indexes` refuses a plan where it cannot.

Written here, not taken from a library: no Python package reads QEMU's log-backend trace lines,
and the classification is coreslice's own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

EVENTS = ("memory_region_ops_read", "memory_region_ops_write")

_LINE = re.compile(
    r"memory_region_ops_(read|write) cpu (-?\d+) mr 0x[0-9a-f]+ addr (0x[0-9a-f]+) "
    r"value 0x[0-9a-f]+ size (\d+) name '([^']*)'")

# Addresses below 64 KiB are I/O ports: the PC's memory there is RAM, never a device region.
IO_SPACE_END = 0x10000
LAPIC = (0xFEE00000, 0xFEE01000)  # Intel SDM vol. 3A 11.4.1: the default local APIC base, 4 KiB
# SDM vol. 3A 11.11.1: an MSI is a write to 0xFEExxxxx with the destination APIC ID in bits 19:12.
# A device QEMU emulates on a CPU's MMIO write (a doorbell) sends its MSI from that CPU's thread,
# so the trace names that CPU: such a write is the slice's own when it targets one of its CPUs.
MSI = (0xFEE00000, 0xFEF00000)

# What a foreign address is, for the report and the README (PC/AT and ICH9 I/O map; the
# IOAPIC and HPET at their ACPI MADT/HPET-table addresses on the q35 machine).
_IO_NAMES = [
    (0x00, 0x20, "ISA DMA controller 1"),
    (0x20, 0x22, "8259 PIC (master)"),
    (0x40, 0x44, "8254 PIT"),
    (0x60, 0x61, "i8042 keyboard controller (data)"),
    (0x61, 0x62, "port 0x61 (PIT gate, speaker, NMI status)"),
    (0x64, 0x65, "i8042 keyboard controller (command: 0xFE resets the machine)"),
    (0x70, 0x72, "CMOS/RTC"),
    (0x80, 0x81, "port 0x80 (POST code, I/O delay)"),
    (0x81, 0x90, "ISA DMA page registers"),
    (0x92, 0x93, "port 0x92 (fast A20, reset)"),
    (0xA0, 0xA2, "8259 PIC (slave)"),
    (0xB2, 0xB4, "APM/SMI control"),
    (0xC0, 0xE0, "ISA DMA controller 2"),
    (0x2E8, 0x2F0, "legacy UART COM4"),
    (0x2F8, 0x300, "legacy UART COM2"),
    (0x3E8, 0x3F0, "legacy UART COM3"),
    (0x3F8, 0x400, "legacy UART COM1 (the host's console)"),
    (0x4D0, 0x4D2, "8259 ELCR (edge/level control)"),
    (0x510, 0x51C, "QEMU fw_cfg"),
    (0x600, 0x680, "ACPI PM registers (ICH9)"),
    (0xCF9, 0xCFA, "reset control (0xCF9: resets the machine)"),
    (0xCF8, 0xCFC, "PCI configuration address"),
    (0xCFC, 0xD00, "PCI configuration data"),
]
_MEM_NAMES = [
    (0xFEC00000, 0xFEC01000, "IOAPIC"),
    (0xFED00000, 0xFED00400, "HPET"),
    (0xFEE01000, 0xFEF00000, "MSI to another CPU"),
]


def describe(addr: int, ecam: tuple[int, int] | None = None) -> str:
    """A human name for a foreign address."""
    table = _IO_NAMES if addr < IO_SPACE_END else _MEM_NAMES
    for lo, hi, name in table:
        if lo <= addr < hi:
            return name
    if ecam is not None and ecam[0] <= addr < ecam[1]:
        return f"ECAM of bus {(addr - ecam[0]) >> 20:#04x}"
    return "I/O port" if addr < IO_SPACE_END else "MMIO"


@dataclass(frozen=True)
class Access:
    write: bool
    cpu: int
    addr: int
    size: int
    region: str


def parse_line(line: str) -> Access | None:
    m = _LINE.search(line)
    if m is None:
        return None
    return Access(m.group(1) == "write", int(m.group(2)), int(m.group(3), 16), int(m.group(4)), m.group(5))


@dataclass
class Owned:
    """A slice's own address ranges ([start, end) pairs) and the ECAM window it may use."""
    io: list[tuple[int, int]] = field(default_factory=list)
    mem: list[tuple[int, int]] = field(default_factory=list)
    apic_ids: set[int] = field(default_factory=set)  # MSI destinations that are the slice's

    def owns(self, addr: int) -> bool:
        if MSI[0] <= addr < MSI[1] and not LAPIC[0] <= addr < LAPIC[1]:
            return (addr >> 12) & 0xFF in self.apic_ids
        ranges = self.io if addr < IO_SPACE_END else self.mem
        return any(lo <= addr < hi for lo, hi in ranges)


# An ISA 16550 decodes 8 ports from its base (the UART's register file).
UART_PORTS = 8


def owned_from_plan(plan: dict) -> Owned:
    """The ranges of ``coreslice boot --json``'s ``plan`` that belong to the slice."""
    own = Owned(mem=[LAPIC], apic_ids={c["apic_id"] for c in plan.get("cpus", [])})
    console = plan.get("console") or {}
    if console.get("port") is not None and not console.get("pci_address"):
        own.io.append((console["port"], console["port"] + UART_PORTS))
    pci = plan.get("pci") or {}
    for root in pci.get("roots", []):
        for w in root.get("io", []):
            own.io.append((w["start"], w["end"] + 1))
        for key in ("mem_below_4g", "mem_above_4g"):
            for w in root.get(key, []):
                own.mem.append((w["start"], w["end"] + 1))
    for m in pci.get("mcfg", []):
        # ACPI MCFG: base_address is bus 0's; each bus has 1 MiB (PCI Firmware spec 4.1.2).
        own.mem.append((m["base_address"] + (m["start_bus"] << 20), m["base_address"] + ((m["end_bus"] + 1) << 20)))
    return own


def slice_cpu_indexes(plan: dict, smp: int) -> list[int]:
    """QEMU CPU indexes of the slice's CPUs (= their APIC IDs on a flat ``-smp`` machine)."""
    ids = [c["apic_id"] for c in plan["cpus"]]
    if any(not 0 <= a < smp for a in ids):
        raise ValueError(f"APIC IDs {ids} are not CPU indexes of a flat -smp {smp} machine; "
                         "the audit maps CPUs by APIC ID")
    return ids


def summarize(lines: Iterable[str], slices: dict[int, tuple[list[int], Owned]],
              ecam: tuple[int, int] | None = None) -> dict[int, dict]:
    """slice index -> {"cpus", "foreign": [...], "own": [...], "accesses"} from trace lines.

    Each list holds one entry per (region, addr): {"region", "addr", "what", "reads", "writes"},
    most accessed first.  ``ecam`` (the machine's whole ECAM window) only names foreign ECAM."""
    by_cpu: dict[int, int] = {cpu: i for i, (cpus, _) in slices.items() for cpu in cpus}
    counts: dict[int, dict[tuple[str, int], list[int]]] = {i: {} for i in slices}
    for line in lines:
        a = parse_line(line)
        if a is None or a.cpu not in by_cpu:
            continue
        c = counts[by_cpu[a.cpu]].setdefault((a.region, a.addr), [0, 0])
        c[1 if a.write else 0] += 1
    out = {}
    for i, (cpus, own) in slices.items():
        foreign, mine = [], []
        for (region, addr), (reads, writes) in counts[i].items():
            entry = {"region": region, "addr": addr, "what": describe(addr, ecam), "reads": reads, "writes": writes}
            (mine if own.owns(addr) else foreign).append(entry)
        key = lambda e: (-(e["reads"] + e["writes"]), e["addr"])  # noqa: E731
        out[i] = {"cpus": cpus, "foreign": sorted(foreign, key=key), "own": sorted(mine, key=key),
                  "accesses": sum(r + w for r, w in counts[i].values())}
    return out


def foreign_by_what(audit: dict) -> dict[str, dict]:
    """The foreign entries of one slice's audit grouped by what they are: {what: {reads, writes}}."""
    out: dict[str, dict] = {}
    for e in audit["foreign"]:
        g = out.setdefault(e["what"], {"reads": 0, "writes": 0})
        g["reads"] += e["reads"]
        g["writes"] += e["writes"]
    return out


# What a stock 6.12 kernel still reaches in a slice on the emulated machine, with the slice's
# command line and tables as coreslice builds them (README "What a slice still touches").  Keys
# are describe()'s names; the end-to-end audit test fails on anything else.
STOCK_KERNEL_RESIDUE = {
    "8254 PIT": "cpu_khz calibration (tsc.c native_calibrate_cpu_early) without CPUID leaf 0x16",
    "port 0x61 (PIT gate, speaker, NMI status)": "the same calibration gates PIT channel 2 here",
    "CMOS/RTC": "the wall clock read at boot (mach_get_cmos_time); with SMP, CMOS 0xF warm-reset code",
    "IOAPIC": "mp_register_ioapic reads the host's IOAPIC from the BIOS MP table (noapic leaves it)",
    "8259 ELCR (edge/level control)": "read and rewritten as is at boot",
    "ISA DMA page registers": "one read at boot",
    "PCI configuration address": "trim_snb_memory reads 00:02.0's vendor ID before the command line is parsed",
    "PCI configuration data": "the same read",
}
