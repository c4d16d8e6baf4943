"""The slice's DSDT: processor devices, and the PCI root complexes that hold its PCI functions.

Processors are ``Device (Cxxx)`` objects with _HID "ACPI0007" (§8.4, "Declaring Processors") whose
_UID matches the ACPI processor UID of their MADT entry, Local APIC or x2APIC (tables.build_madt
numbers slice CPUs from 0).  Each PCI root is a PNP0A08 host bridge (§6.1.5 _HID, PCI Firmware Spec) whose _CRS
lists the windows the host's kernel reports as "root bus resource"; only roots that hold a
function given to the slice belong here (DESIGN.md §3).  There is no _OSC: the host owns the root
ports, so the slice must not take over native PCIe services (AER, PME, hot-plug) on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from coreslice.errors import UsageError
from coreslice.acpi.aml import (
    AddressSpace,
    Aml,
    DefinitionBlock,
    Device,
    DWordMemory,
    EisaId,
    Name,
    QWordMemory,
    ResourceTemplate,
    Scope,
    WordBusNumber,
    WordIO,
)

MAX_CPU_UID = 0xFFF   # Cxxx: three hex digits
MAX_PCI_ROOTS = 0x100  # PCxx: two hex digits
_4G = 1 << 32


@dataclass(frozen=True)
class Dsdt:
    aml: bytes  # the complete table, header included
    asl: str    # the same, as ASL that iasl compiles to identical AML (header aside)


@dataclass(frozen=True)
class PciRoot:
    """One PCI root complex and its windows; ranges are inclusive (first, last), as in dmesg."""

    bus_start: int
    bus_end: int
    segment: int = 0
    io: tuple[tuple[int, int], ...] = ()
    mem: tuple[tuple[int, int], ...] = ()  # DWordMemory if it ends below 4 GiB, else QWordMemory


def cpu_device_name(uid: int) -> str:
    return f"C{uid:03X}"


def processor_device(uid: int) -> Device:
    return Device(cpu_device_name(uid), Name("_HID", "ACPI0007"), Name("_UID", uid))


def pci_root_device(uid: int, root: PciRoot) -> Device:
    """Device (PCxx) for ``root``; raises ValueError if a bus range or window does not fit."""
    if not (0 <= root.bus_start <= root.bus_end <= 0xFF and 0 <= root.segment <= 0xFFFF):
        raise ValueError(f"buses {root.bus_start:#x}-{root.bus_end:#x} of segment {root.segment:#x}: "
                         "need start <= end <= 0xff and segment <= 0xffff")
    windows: list[AddressSpace] = [WordBusNumber(root.bus_start, root.bus_end)]
    windows += [WordIO(first, last) for first, last in root.io]
    windows += [(DWordMemory if last < _4G else QWordMemory)(first, last) for first, last in root.mem]
    return Device(
        f"PC{uid:02X}",
        Name("_HID", EisaId("PNP0A08")),  # PCI Express root bridge
        Name("_CID", EisaId("PNP0A03")),  # compatible: PCI root bridge
        Name("_SEG", root.segment),
        Name("_BBN", root.bus_start),
        Name("_UID", uid),
        Name("_CRS", ResourceTemplate(*windows)),
    )


def build_dsdt(cpu_uids: Sequence[int], pci_roots: Sequence[PciRoot] = ()) -> Dsdt:
    if not cpu_uids:
        raise UsageError("the DSDT needs at least one processor UID")
    if len(set(cpu_uids)) != len(cpu_uids):
        raise UsageError(f"processor UIDs must be unique, got {list(cpu_uids)}")
    if not all(0 <= uid <= MAX_CPU_UID for uid in cpu_uids):
        raise UsageError(f"processor UIDs must be within 0..{MAX_CPU_UID:#x}, got {list(cpu_uids)}")
    if len(pci_roots) > MAX_PCI_ROOTS:
        raise UsageError(f"at most {MAX_PCI_ROOTS} PCI roots, got {len(pci_roots)}")
    children: list[Aml] = [processor_device(uid) for uid in cpu_uids]
    try:
        children += [pci_root_device(uid, root) for uid, root in enumerate(pci_roots)]
    except ValueError as e:  # a bus range or window that does not fit its descriptor
        raise UsageError(f"bad PCI root: {e}") from None
    # "_SB", not "\_SB": at the root both name the same scope, and iasl shortens it to this.
    table = DefinitionBlock("DSDT", Scope("_SB", *children))
    return Dsdt(aml=table.encode(), asl=table.to_asl())
