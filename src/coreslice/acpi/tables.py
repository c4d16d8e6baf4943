"""ACPI table layouts (ACPI 6.5 chapter 5; MCFG from the PCI Firmware Specification 3.3).

Each layout is declared once, as a packed little-endian ctypes structure next to the section that
defines it, and serves both to parse the host's tables and to build the slice's.  Builders are pure:
same input, same bytes.

What the slice gets (``build_slice_tables``): RSDP -> XSDT -> {FADT -> DSDT, MADT, MCFG?}.  The FADT
is hardware-reduced, so there is no FACS, no PM blocks, no SCI, no legacy devices; the MADT lists
processors only (Local APIC or x2APIC entries, by APIC ID) and no IOAPIC, so the slice never
programs the host's 8259 or IOAPIC.
"""

from __future__ import annotations

import ctypes
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from coreslice.acpi.errors import AcpiFormatError
from coreslice.cstruct import U8, U16, U32, U64, PackedStruct
from coreslice.errors import UsageError

# Identity written into every table we build.  The creator is coreslice itself ("CSLC"); bump
# CREATOR_REVISION when the generated layout changes in a way someone reading a slice's
# /sys/firmware/acpi/tables might care about.
OEM_ID = b"CSLICE"
OEM_TABLE_ID = b"CORESLIC"
OEM_REVISION = 1
CREATOR_ID = b"CSLC"
CREATOR_REVISION = 1

ALIGN = 16  # RSDP must be 16-byte aligned (§5.2.5.1); we align every table the same way

AcpiTableError = AcpiFormatError  # the earlier name, still used by callers


class _Struct(PackedStruct):
    """ACPI layouts: a host table too short for one is an AcpiFormatError."""

    format_error = AcpiFormatError

    @classmethod
    def size(cls) -> int:
        """The earlier name of sizeof(), kept for callers outside acpi/ (tests/unit/test_numa.py)."""
        return cls.sizeof()


_S = TypeVar("_S", bound=_Struct)


# ---------------------------------------------------------------------------------------------
# §5.2.6 System Description Table Header, and the checksum every table carries.

class SdtHeader(_Struct):
    _fields_ = [
        ("signature", ctypes.c_char * 4),
        ("length", U32),            # whole table, header included
        ("revision", U8),
        ("checksum", U8),           # whole table sums to 0 mod 256
        ("oem_id", ctypes.c_char * 6),
        ("oem_table_id", ctypes.c_char * 8),
        ("oem_revision", U32),
        ("creator_id", ctypes.c_char * 4),
        ("creator_revision", U32),
    ]


def checksum(data: bytes | bytearray) -> int:
    """Sum of ``data`` mod 256: 0 for a valid table (§5.2.6) or RSDP (§5.2.5.3)."""
    return sum(data) & 0xFF


def new_header(signature: bytes, revision: int) -> SdtHeader:
    """A header with our identity; ``seal`` fills in length and checksum."""
    return SdtHeader(
        signature=signature, revision=revision, oem_id=OEM_ID, oem_table_id=OEM_TABLE_ID,
        oem_revision=OEM_REVISION, creator_id=CREATOR_ID, creator_revision=CREATOR_REVISION,
    )


def seal(table: bytes) -> bytes:
    """Set Length and Checksum of a table that starts with an SdtHeader."""
    buf = bytearray(table)
    struct.pack_into("<I", buf, SdtHeader.length.offset, len(buf))
    buf[SdtHeader.checksum.offset] = 0
    buf[SdtHeader.checksum.offset] = -checksum(buf) & 0xFF
    return bytes(buf)


def _parse_table(raw: bytes, signature: bytes, fixed: type[_S]) -> tuple[_S, bytes]:
    """Check signature and length; return the fixed part and the table trimmed to its Length.

    The checksum is not enforced: Linux only warns about a bad one, and so must we accept the
    host's tables as Linux does.
    """
    name = signature.decode()
    hdr = SdtHeader.parse(raw, what=f"{name} header")
    if hdr.signature != signature:
        raise AcpiFormatError(f"expected a {name} table, found signature {hdr.signature!r}")
    if not fixed.sizeof() <= hdr.length <= len(raw):
        raise AcpiFormatError(f"{name} Length {hdr.length} is out of range (have {len(raw)} bytes)")
    return fixed.parse(raw, what=name), raw[: hdr.length]


# ---------------------------------------------------------------------------------------------
# §5.2.5.3 Root System Description Pointer, revision 2.

class Rsdp(_Struct):
    _fields_ = [
        ("signature", ctypes.c_char * 8),
        ("checksum", U8),           # covers the first RSDP_V1_LENGTH bytes
        ("oem_id", ctypes.c_char * 6),
        ("revision", U8),           # 2: ACPI 2.0+ layout, with XSDT
        ("rsdt_address", U32),      # 0: no RSDT, the OS uses the XSDT
        ("length", U32),
        ("xsdt_address", U64),
        ("extended_checksum", U8),  # covers the whole structure
        ("reserved", U8 * 3),
    ]


RSDP_SIGNATURE = b"RSD PTR "
RSDP_V1_LENGTH = 20


def build_rsdp(xsdt_addr: int) -> bytes:
    rsdp = Rsdp(signature=RSDP_SIGNATURE, oem_id=OEM_ID, revision=2, length=Rsdp.sizeof(),
                xsdt_address=xsdt_addr)
    buf = bytearray(rsdp)
    buf[Rsdp.checksum.offset] = -checksum(buf[:RSDP_V1_LENGTH]) & 0xFF
    buf[Rsdp.extended_checksum.offset] = -checksum(buf) & 0xFF
    return bytes(buf)


# ---------------------------------------------------------------------------------------------
# §5.2.8 Extended System Description Table: header + 64-bit table addresses.

XSDT_REVISION = 1


def build_xsdt(table_addrs: Sequence[int]) -> bytes:
    return seal(bytes(new_header(b"XSDT", XSDT_REVISION)) + struct.pack(f"<{len(table_addrs)}Q", *table_addrs))


# ---------------------------------------------------------------------------------------------
# §5.2.3.2 Generic Address Structure, used by the FADT.

class Gas(_Struct):
    _fields_ = [
        ("address_space_id", U8),
        ("register_bit_width", U8),
        ("register_bit_offset", U8),
        ("access_size", U8),
        ("address", U64),
    ]


# §5.2.9 Fixed ACPI Description Table (revision 6, 276 bytes).

class Fadt(_Struct):
    _fields_ = [
        ("header", SdtHeader),
        ("firmware_ctrl", U32),
        ("dsdt", U32),
        ("reserved0", U8),
        ("preferred_pm_profile", U8),
        ("sci_int", U16),
        ("smi_cmd", U32),
        ("acpi_enable", U8),
        ("acpi_disable", U8),
        ("s4bios_req", U8),
        ("pstate_cnt", U8),
        ("pm1a_evt_blk", U32),
        ("pm1b_evt_blk", U32),
        ("pm1a_cnt_blk", U32),
        ("pm1b_cnt_blk", U32),
        ("pm2_cnt_blk", U32),
        ("pm_tmr_blk", U32),
        ("gpe0_blk", U32),
        ("gpe1_blk", U32),
        ("pm1_evt_len", U8),
        ("pm1_cnt_len", U8),
        ("pm2_cnt_len", U8),
        ("pm_tmr_len", U8),
        ("gpe0_blk_len", U8),
        ("gpe1_blk_len", U8),
        ("gpe1_base", U8),
        ("cst_cnt", U8),
        ("p_lvl2_lat", U16),
        ("p_lvl3_lat", U16),
        ("flush_size", U16),
        ("flush_stride", U16),
        ("duty_offset", U8),
        ("duty_width", U8),
        ("day_alrm", U8),
        ("mon_alrm", U8),
        ("century", U8),
        ("iapc_boot_arch", U16),    # §5.2.9.3
        ("reserved1", U8),
        ("flags", U32),             # §5.2.9, Table "Fixed ACPI Description Table Fixed Feature Flags"
        ("reset_reg", Gas),
        ("reset_value", U8),
        ("arm_boot_arch", U16),
        ("fadt_minor_version", U8),  # offset 131
        ("x_firmware_ctrl", U64),
        ("x_dsdt", U64),
        ("x_pm1a_evt_blk", Gas),
        ("x_pm1b_evt_blk", Gas),
        ("x_pm1a_cnt_blk", Gas),
        ("x_pm1b_cnt_blk", Gas),
        ("x_pm2_cnt_blk", Gas),
        ("x_pm_tmr_blk", Gas),
        ("x_gpe0_blk", Gas),
        ("x_gpe1_blk", Gas),
        ("sleep_control_reg", Gas),
        ("sleep_status_reg", Gas),
        ("hypervisor_vendor_identity", U64),
    ]


# FADT 6.5 (header revision 6, minor version 5).  Linux honours the MADT Online Capable flag only
# from FADT 6.3 on, and the host-BSP entry of our MADT relies on it.
FADT_REVISION = 6
FADT_MINOR_VERSION = 5

# Fixed feature flags, §5.2.9 Table 5.10.
FADT_WBINVD = 1 << 0             # WBINVD works (true of every x86 CPU we run on)
FADT_HW_REDUCED_ACPI = 1 << 20   # no PM/GPE blocks, no SCI, no FACS (§4.1)

# IA-PC boot architecture flags, §5.2.9.3.  LEGACY_DEVICES (bit 0) and 8042 (bit 1) stay clear.
IAPC_VGA_NOT_PRESENT = 1 << 2    # do not probe the host's VGA ports
IAPC_PCIE_ASPM_CONTROLS = 1 << 4  # do not let the slice re-program ASPM on links it shares
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5  # the CMOS RTC belongs to the host


def build_fadt(dsdt_addr: int) -> bytes:
    fadt = Fadt(
        header=new_header(b"FACP", FADT_REVISION),
        flags=FADT_WBINVD | FADT_HW_REDUCED_ACPI,
        iapc_boot_arch=IAPC_VGA_NOT_PRESENT | IAPC_PCIE_ASPM_CONTROLS | IAPC_CMOS_RTC_NOT_PRESENT,
        fadt_minor_version=FADT_MINOR_VERSION,
        # DSDT (32-bit) stays 0: §5.2.9 says it is ignored when X_DSDT is non-zero, and ACPICA
        # warns if the two disagree.
        x_dsdt=dsdt_addr,
    )
    return seal(bytes(fadt))


# ---------------------------------------------------------------------------------------------
# §5.2.12 Multiple APIC Description Table.

class MadtFixed(_Struct):
    _fields_ = [
        ("header", SdtHeader),
        ("local_apic_address", U32),
        ("flags", U32),             # bit 0 PCAT_COMPAT (§5.2.12, "Multiple APIC Flags")
    ]


class MadtEntryHeader(_Struct):  # §5.2.12: every interrupt controller structure starts so
    _fields_ = [("type", U8), ("length", U8)]


class MadtLocalApic(_Struct):  # §5.2.12.2 Processor Local APIC Structure, type 0
    _fields_ = [
        ("type", U8),
        ("length", U8),
        ("processor_uid", U8),
        ("apic_id", U8),
        ("flags", U32),             # §5.2.12.2 "Local APIC Flags"
    ]


class MadtLocalX2Apic(_Struct):  # §5.2.12.12 Processor Local x2APIC Structure, type 9
    _fields_ = [
        ("type", U8),
        ("length", U8),
        ("reserved", U16),
        ("x2apic_id", U32),
        ("flags", U32),             # same flags as the Local APIC structure
        ("processor_uid", U32),
    ]


MADT_REVISION = 5
MADT_TYPE_LOCAL_APIC = 0
MADT_TYPE_LOCAL_X2APIC = 9
MADT_PCAT_COMPAT = 1 << 0
LAPIC_ENABLED = 1 << 0
LAPIC_ONLINE_CAPABLE = 1 << 1   # only meaningful when Enabled is clear (§5.2.12.2)
LOCAL_APIC_ADDRESS = 0xFEE00000  # architectural default
INVALID_X2APIC_ID = 0xFFFFFFFF   # Linux skips x2APIC entries with this ID

# §5.2.12.12: "the Processor Local x2APIC structure is used for APIC ID values 255 and above";
# below that a processor gets a Processor Local APIC structure (§5.2.12.2), whose APIC ID and ACPI
# Processor UID are 8 bits.  Linux follows it: with usable Local APIC entries present it ignores
# x2APIC entries whose ID is below 0xff (arch/x86/kernel/acpi/boot.c, acpi_parse_x2apic).
X2APIC_MIN_ID = 0xFF
LAPIC_MAX_UID = 0xFF

# UIDs of the host-BSP placeholder entry.  No DSDT processor object has them (slice CPUs are
# numbered from 0).  x2APIC: not 0xFFFFFFFF, which Linux uses as its "no ACPI ID" sentinel
# (CPU_ACPIID_INVALID).  Local APIC: the largest 8-bit UID, free while the slice has at most 255
# CPUs.
HOST_BSP_UID = 0xFFFFFFFE
HOST_BSP_LAPIC_UID = 0xFF

_MADT_KINDS = {MADT_TYPE_LOCAL_APIC: ("lapic", MadtLocalApic), MADT_TYPE_LOCAL_X2APIC: ("x2apic", MadtLocalX2Apic)}


@dataclass(frozen=True)
class MadtProcessor:
    uid: int
    apic_id: int
    enabled: bool
    online_capable: bool
    kind: str  # "lapic" (type 0) or "x2apic" (type 9)


@dataclass(frozen=True)
class Madt:
    local_apic_address: int
    flags: int
    processors: list[MadtProcessor]


def parse_madt(raw: bytes) -> Madt:
    """Processor entries of a MADT, in table order; other structure types are skipped."""
    fixed, raw = _parse_table(raw, b"APIC", MadtFixed)
    processors = []
    offset = MadtFixed.sizeof()
    while offset < len(raw):
        entry = MadtEntryHeader.parse(raw, offset, "MADT entry")
        if entry.length < MadtEntryHeader.sizeof() or offset + entry.length > len(raw):
            raise AcpiFormatError(f"MADT entry type {entry.type} at offset 0x{offset:x} has bad length {entry.length}")
        if entry.type in _MADT_KINDS:
            kind, layout = _MADT_KINDS[entry.type]
            if entry.length < layout.sizeof():
                raise AcpiFormatError(
                    f"MADT {kind} entry at offset 0x{offset:x} is {entry.length} bytes, needs {layout.sizeof()}")
            e = layout.parse(raw, offset)
            processors.append(MadtProcessor(
                uid=e.processor_uid,
                apic_id=e.x2apic_id if kind == "x2apic" else e.apic_id,
                enabled=bool(e.flags & LAPIC_ENABLED),
                online_capable=bool(e.flags & LAPIC_ONLINE_CAPABLE),
                kind=kind,
            ))
        offset += entry.length
    return Madt(local_apic_address=fixed.local_apic_address, flags=fixed.flags, processors=processors)


def _processor_entry(apic_id: int, uid: int, flags: int) -> bytes:
    """A Local APIC entry (type 0) for an APIC ID below 255, else a Local x2APIC entry (type 9)."""
    if apic_id < X2APIC_MIN_ID:
        return bytes(MadtLocalApic(type=MADT_TYPE_LOCAL_APIC, length=MadtLocalApic.sizeof(),
                                   processor_uid=uid, apic_id=apic_id, flags=flags))
    return bytes(MadtLocalX2Apic(type=MADT_TYPE_LOCAL_X2APIC, length=MadtLocalX2Apic.sizeof(),
                                 x2apic_id=apic_id, flags=flags, processor_uid=uid))


def build_madt(apic_ids: Sequence[int], host_bsp_apic_id: int) -> bytes:
    """The host BSP first (online capable, not enabled), then the slice's CPUs (enabled), each as
    a Local APIC entry if its APIC ID is below 255 and as a Local x2APIC entry otherwise.

    Linux >= 6.9 takes the first MADT APIC for the boot CPU and, seeing IA32_APIC_BASE.BSP clear,
    assumes a crash kernel and brings up only one CPU.  Listing the real BSP first, not enabled,
    makes the slice recognise it as "the real BSP" and start all of its own CPUs (DESIGN.md §3);
    Linux enumerates both entry types in table order, so "first" holds across types.
    Slice CPU i gets ACPI processor UID i, matching the DSDT's processor devices.
    PCAT_COMPAT stays clear: the slice must not touch the host's 8259.
    """
    _check_apic_ids(apic_ids, host_bsp_apic_id)
    bsp_uid = HOST_BSP_LAPIC_UID if host_bsp_apic_id < X2APIC_MIN_ID else HOST_BSP_UID
    for uid, apic_id in enumerate(apic_ids):
        if apic_id < X2APIC_MIN_ID and uid > LAPIC_MAX_UID:
            raise UsageError(f"slice CPU {uid} (APIC ID {apic_id}) needs a Local APIC entry, whose ACPI "
                             f"processor UID has 8 bits; list CPUs with APIC IDs below 255 first")
        if uid == bsp_uid:
            raise UsageError(f"a slice of {len(apic_ids)} CPUs needs UID {uid:#x}, the host boot CPU's "
                             f"placeholder (APIC ID {host_bsp_apic_id}); give the slice at most {bsp_uid} CPUs")
    fixed = MadtFixed(header=new_header(b"APIC", MADT_REVISION), local_apic_address=LOCAL_APIC_ADDRESS, flags=0)
    entries = [_processor_entry(host_bsp_apic_id, bsp_uid, LAPIC_ONLINE_CAPABLE)]
    entries += [_processor_entry(apic_id, uid, LAPIC_ENABLED) for uid, apic_id in enumerate(apic_ids)]
    return seal(bytes(fixed) + b"".join(entries))


def _check_apic_ids(apic_ids: Sequence[int], host_bsp_apic_id: int) -> None:
    if not apic_ids:
        raise UsageError("a slice needs at least one CPU: the APIC ID list is empty")
    for apic_id in (*apic_ids, host_bsp_apic_id):
        if not 0 <= apic_id < INVALID_X2APIC_ID:
            raise UsageError(f"APIC ID {apic_id:#x} is out of range (0..0xfffffffe)")
    dups = sorted(a for a, n in Counter(apic_ids).items() if n > 1)
    if dups:
        raise UsageError(f"APIC IDs listed twice for the slice: {', '.join(map(str, dups))}")
    if host_bsp_apic_id in apic_ids:
        raise UsageError(f"APIC ID {host_bsp_apic_id} is the host's boot CPU; remove it from the slice's CPUs")


# ---------------------------------------------------------------------------------------------
# PCI Firmware Specification 3.3 §4.1.2, "MCFG table": header, 8 reserved bytes, allocations.

class McfgFixed(_Struct):
    _fields_ = [("header", SdtHeader), ("reserved", U64)]


class McfgEntry(_Struct):  # PCI Firmware Spec 3.3 Table 4-3, one ECAM allocation
    _fields_ = [
        ("base_address", U64),
        ("segment", U16),
        ("start_bus", U8),
        ("end_bus", U8),
        ("reserved", U32),
    ]


MCFG_REVISION = 1


@dataclass(frozen=True)
class McfgAllocation:
    base_address: int
    segment: int
    start_bus: int
    end_bus: int


def parse_mcfg(raw: bytes) -> list[McfgAllocation]:
    _, raw = _parse_table(raw, b"MCFG", McfgFixed)
    body = raw[McfgFixed.sizeof():]
    if len(body) % McfgEntry.sizeof():
        raise AcpiFormatError(f"MCFG allocations take {len(body)} bytes, not a multiple of {McfgEntry.sizeof()}")
    return [
        McfgAllocation(e.base_address, e.segment, e.start_bus, e.end_bus)
        for e in (McfgEntry.parse(body, off) for off in range(0, len(body), McfgEntry.sizeof()))
    ]


def build_mcfg(allocations: Sequence[McfgAllocation]) -> bytes:
    for a in allocations:
        if not (0 <= a.base_address < 1 << 64 and 0 <= a.segment <= 0xFFFF and 0 <= a.start_bus <= a.end_bus <= 0xFF):
            raise UsageError(f"bad MCFG allocation {a}: need segment <= 0xffff and start_bus <= end_bus <= 0xff")
    entries = b"".join(bytes(McfgEntry(a.base_address, a.segment, a.start_bus, a.end_bus)) for a in allocations)
    return seal(bytes(McfgFixed(header=new_header(b"MCFG", MCFG_REVISION))) + entries)


# ---------------------------------------------------------------------------------------------
# §5.2.16 System Resource Affinity Table: header, two reserved fields, then affinity structures
# that put processors (by APIC ID) and memory ranges into proximity domains.

class SratFixed(_Struct):
    _fields_ = [
        ("header", SdtHeader),
        ("table_revision", U32),    # "Reserved, must be 1" (kept for backward compatibility)
        ("reserved", U64),
    ]


class SratEntryHeader(_Struct):  # every static resource allocation structure starts so
    _fields_ = [("type", U8), ("length", U8)]


class SratLocalApic(_Struct):  # §5.2.16.1 Processor Local APIC/SAPIC Affinity Structure, type 0
    _fields_ = [
        ("type", U8),
        ("length", U8),             # 16
        ("proximity_domain_lo", U8),  # bits 7:0 of the domain
        ("apic_id", U8),
        ("flags", U32),             # bit 0 Enabled
        ("local_sapic_eid", U8),
        ("proximity_domain_hi", U8 * 3),  # bits 31:8
        ("clock_domain", U32),
    ]


class SratMemoryAffinity(_Struct):  # §5.2.16.2 Memory Affinity Structure, type 1
    _fields_ = [
        ("type", U8),
        ("length", U8),             # 40
        ("proximity_domain", U32),
        ("reserved1", U16),
        ("base_address", U64),      # spelled as Low/High DWORDs in the spec: same bytes
        ("range_length", U64),
        ("reserved2", U32),
        ("flags", U32),             # bit 0 Enabled, bit 1 Hot Pluggable, bit 2 NonVolatile
        ("reserved3", U64),
    ]


class SratLocalX2Apic(_Struct):  # §5.2.16.3 Processor Local x2APIC Affinity Structure, type 2
    _fields_ = [
        ("type", U8),
        ("length", U8),             # 24
        ("reserved1", U16),
        ("proximity_domain", U32),
        ("x2apic_id", U32),
        ("flags", U32),             # bit 0 Enabled
        ("clock_domain", U32),
        ("reserved2", U32),
    ]


SRAT_REVISION = 3
SRAT_TYPE_LOCAL_APIC = 0
SRAT_TYPE_MEMORY = 1
SRAT_TYPE_LOCAL_X2APIC = 2
SRAT_ENABLED = 1 << 0
SRAT_MEM_HOT_PLUGGABLE = 1 << 1
SRAT_MEM_NON_VOLATILE = 1 << 2


@dataclass(frozen=True)
class SratCpu:
    proximity_domain: int
    apic_id: int
    enabled: bool
    kind: str  # "lapic" (type 0) or "x2apic" (type 2)


@dataclass(frozen=True)
class SratMemory:
    proximity_domain: int
    base: int
    length: int
    enabled: bool
    hot_pluggable: bool = False
    non_volatile: bool = False

    @property
    def end(self) -> int:
        return self.base + self.length


@dataclass(frozen=True)
class Srat:
    cpus: list[SratCpu]       # in table order (Linux numbers nodes by first appearance)
    memory: list[SratMemory]


_SRAT_KINDS = {SRAT_TYPE_LOCAL_APIC: SratLocalApic, SRAT_TYPE_MEMORY: SratMemoryAffinity,
               SRAT_TYPE_LOCAL_X2APIC: SratLocalX2Apic}


def parse_srat(raw: bytes) -> Srat:
    """Processor and memory affinity entries in table order; other types (GICC, ITS, generic
    initiator) are skipped."""
    _, raw = _parse_table(raw, b"SRAT", SratFixed)
    cpus, memory = [], []
    offset = SratFixed.sizeof()
    while offset < len(raw):
        entry = SratEntryHeader.parse(raw, offset, "SRAT entry")
        if entry.length < SratEntryHeader.sizeof() or offset + entry.length > len(raw):
            raise AcpiFormatError(f"SRAT entry type {entry.type} at offset 0x{offset:x} has bad length {entry.length}")
        layout = _SRAT_KINDS.get(entry.type)
        if layout is not None:
            if entry.length < layout.sizeof():
                raise AcpiFormatError(f"SRAT entry type {entry.type} at offset 0x{offset:x} is {entry.length} "
                                     f"bytes, needs {layout.sizeof()}")
            e = layout.parse(raw, offset)
            if entry.type == SRAT_TYPE_LOCAL_APIC:
                hi = bytes(e.proximity_domain_hi)
                pxm = e.proximity_domain_lo | int.from_bytes(hi, "little") << 8
                cpus.append(SratCpu(pxm, e.apic_id, bool(e.flags & SRAT_ENABLED), "lapic"))
            elif entry.type == SRAT_TYPE_LOCAL_X2APIC:
                cpus.append(SratCpu(e.proximity_domain, e.x2apic_id, bool(e.flags & SRAT_ENABLED), "x2apic"))
            else:
                memory.append(SratMemory(e.proximity_domain, e.base_address, e.range_length,
                                         bool(e.flags & SRAT_ENABLED), bool(e.flags & SRAT_MEM_HOT_PLUGGABLE),
                                         bool(e.flags & SRAT_MEM_NON_VOLATILE)))
        offset += entry.length
    return Srat(cpus=cpus, memory=memory)


def build_srat(srat: Srat) -> bytes:
    """The inverse of parse_srat: APIC IDs below 0xff as type 0 entries (as firmware writes
    them) unless the entry says x2apic, then the memory entries."""
    parts = [bytes(SratFixed(header=new_header(b"SRAT", SRAT_REVISION), table_revision=1))]
    for c in srat.cpus:
        flags = SRAT_ENABLED if c.enabled else 0
        if c.kind == "lapic":
            if c.apic_id > 0xFF:
                raise UsageError(f"APIC ID {c.apic_id:#x} needs an x2APIC affinity entry (type 2)")
            hi = (U8 * 3)(*((c.proximity_domain >> s) & 0xFF for s in (8, 16, 24)))
            parts.append(bytes(SratLocalApic(type=SRAT_TYPE_LOCAL_APIC, length=SratLocalApic.sizeof(),
                                             proximity_domain_lo=c.proximity_domain & 0xFF,
                                             apic_id=c.apic_id, flags=flags, proximity_domain_hi=hi)))
        else:
            parts.append(bytes(SratLocalX2Apic(type=SRAT_TYPE_LOCAL_X2APIC, length=SratLocalX2Apic.sizeof(),
                                               proximity_domain=c.proximity_domain, x2apic_id=c.apic_id,
                                               flags=flags)))
    for m in srat.memory:
        flags = ((SRAT_ENABLED if m.enabled else 0) | (SRAT_MEM_HOT_PLUGGABLE if m.hot_pluggable else 0)
                 | (SRAT_MEM_NON_VOLATILE if m.non_volatile else 0))
        parts.append(bytes(SratMemoryAffinity(type=SRAT_TYPE_MEMORY, length=SratMemoryAffinity.sizeof(),
                                              proximity_domain=m.proximity_domain, base_address=m.base,
                                              range_length=m.length, flags=flags)))
    return seal(b"".join(parts))


# ---------------------------------------------------------------------------------------------
# The slice's table set.

@dataclass(frozen=True)
class AcpiBlob:
    data: bytes                 # to be written at physical address `base`
    rsdp_addr: int
    tables: dict[str, int]      # signature ("RSDP" for the RSDP) -> physical address


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class SliceTables:
    """The slice's tables with every byte decided but their address: the leaf tables (MADT,
    MCFG, DSDT) are encoded once; :meth:`at` lays out RSDP, XSDT, FADT and the leaves from a
    base and fills in the pointers.  :attr:`size` does not depend on the base, so the plan
    sizes the loader's data area with it and the image builds the tables once, at their place."""

    leaves: dict[str, bytes]
    xsdt_entries: tuple[str, ...]
    sizes: dict[str, int]

    @property
    def size(self) -> int:
        end = 0
        for size in self.sizes.values():
            end = _align(end + size)
        return end

    def at(self, base: int) -> AcpiBlob:
        """Lay out RSDP, XSDT, FADT, MADT, [MCFG], DSDT from ``base`` on, each 16-byte aligned."""
        if base < 0 or base % ALIGN:
            raise UsageError(f"ACPI tables base {base:#x} must be {ALIGN}-byte aligned")
        addrs, cursor = {}, base
        for sig, size in self.sizes.items():
            addrs[sig] = cursor
            cursor = _align(cursor + size)
        if cursor > 1 << 64:
            raise UsageError(f"ACPI tables at {base:#x} run past the 64-bit address space")
        tables = {
            "RSDP": build_rsdp(addrs["XSDT"]),
            "XSDT": build_xsdt([addrs[sig] for sig in self.xsdt_entries]),
            "FACP": build_fadt(addrs["DSDT"]),
            **self.leaves,
        }
        data = bytearray(cursor - base)
        for sig, table in tables.items():
            assert len(table) == self.sizes[sig], sig
            off = addrs[sig] - base
            data[off : off + len(table)] = table
        return AcpiBlob(data=bytes(data), rsdp_addr=addrs["RSDP"], tables=addrs)


def prepare_slice_tables(
    *,
    apic_ids: Sequence[int],
    host_bsp_apic_id: int,
    dsdt_aml: bytes,
    mcfg_allocations: Sequence[McfgAllocation] = (),
) -> SliceTables:
    """Encode the leaf tables once and fix every table's size (see :class:`SliceTables`)."""
    _check_dsdt(dsdt_aml)
    # Tables that do not point at others are built first; their sizes fix everyone's address.
    leaves = {"APIC": build_madt(apic_ids, host_bsp_apic_id)}
    if mcfg_allocations:
        leaves["MCFG"] = build_mcfg(mcfg_allocations)
    leaves["DSDT"] = dsdt_aml
    xsdt_entries = ("FACP", *(sig for sig in leaves if sig != "DSDT"))
    sizes = {"RSDP": Rsdp.sizeof(), "XSDT": SdtHeader.sizeof() + 8 * len(xsdt_entries), "FACP": Fadt.sizeof()}
    sizes |= {sig: len(t) for sig, t in leaves.items()}
    return SliceTables(leaves, xsdt_entries, sizes)


def build_slice_tables(base: int, **tables) -> AcpiBlob:
    """Lay out RSDP, XSDT, FADT, MADT, [MCFG], DSDT from ``base`` on, each 16-byte aligned."""
    if base < 0 or base % ALIGN:
        raise UsageError(f"ACPI tables base {base:#x} must be {ALIGN}-byte aligned")
    return prepare_slice_tables(**tables).at(base)


def _check_dsdt(aml: bytes) -> None:
    try:
        _, trimmed = _parse_table(aml, b"DSDT", SdtHeader)
    except AcpiFormatError as e:
        raise UsageError(f"dsdt_aml is not a DSDT: {e}") from None
    if len(trimmed) != len(aml) or checksum(aml):
        raise UsageError("dsdt_aml is not a complete DSDT: its Length or checksum does not match its bytes")
