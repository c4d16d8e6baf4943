"""ACPI tables: layouts, the slice's table set, and parsing the host's MADT/MCFG.

acpica-tools is a required test dependency: without iasl these tests fail, they do not skip.
"""

import re
import struct

import pytest

from coreslice import cli
from coreslice.acpi import acpica
from coreslice.acpi.dsdt import build_dsdt
from coreslice.acpi.errors import AcpiFormatError
from coreslice.acpi.tables import (
    HOST_BSP_LAPIC_UID,
    HOST_BSP_UID,
    Fadt,
    MadtLocalApic,
    MadtLocalX2Apic,
    McfgAllocation,
    McfgEntry,
    Rsdp,
    SdtHeader,
    build_madt,
    build_mcfg,
    build_slice_tables,
    checksum,
    parse_madt,
    parse_mcfg,
)
from coreslice.errors import UsageError

from ..hosttree import make_host_tree

BASE = 0x7FF00000
APIC_IDS = [2, 4, 6]
HOST_BSP = 0
MCFG = [McfgAllocation(base_address=0xB0000000, segment=0, start_bus=0x20, end_bus=0x2B)]


def slice_tables(**overrides):
    args = dict(apic_ids=APIC_IDS, host_bsp_apic_id=HOST_BSP, dsdt_aml=build_dsdt(range(3)).aml,
                mcfg_allocations=MCFG)
    args.update(overrides)
    return build_slice_tables(BASE, **args)


def table(blob, sig: str) -> bytes:
    off = blob.tables[sig] - BASE
    length = Rsdp.sizeof() if sig == "RSDP" else struct.unpack_from("<I", blob.data, off + 4)[0]
    return blob.data[off : off + length]


def field(dsl: str, label: str) -> list[str]:
    """Values of every ``[off len]  label : value`` line of an iasl -d disassembly."""
    return re.findall(rf"\]\s+{re.escape(label)} : (\S+)", dsl)


# --- layouts ---------------------------------------------------------------------------------

def test_layout_sizes_and_offsets_match_the_spec():
    assert SdtHeader.sizeof() == 36                       # §5.2.6
    assert Rsdp.sizeof() == 36 and Rsdp.xsdt_address.offset == 24  # §5.2.5.3
    assert Fadt.sizeof() == 276                           # §5.2.9, revision 6
    assert Fadt.iapc_boot_arch.offset == 109 and Fadt.flags.offset == 112
    assert Fadt.fadt_minor_version.offset == 131 and Fadt.x_dsdt.offset == 140
    assert Fadt.hypervisor_vendor_identity.offset == 268
    assert MadtLocalX2Apic.sizeof() == 16                 # §5.2.12.12
    assert MadtLocalApic.sizeof() == 8                    # §5.2.12.2
    assert McfgEntry.sizeof() == 16


def test_checksum_is_the_byte_sum():
    assert checksum(b"") == 0
    assert checksum(bytes([0x80, 0x80])) == 0
    assert checksum(bytes([1, 2, 3])) == 6


# --- the slice's table set -------------------------------------------------------------------

def test_every_table_checksums_to_zero_and_is_aligned():
    blob = slice_tables()
    assert set(blob.tables) == {"RSDP", "XSDT", "FACP", "APIC", "MCFG", "DSDT"}
    assert blob.rsdp_addr == blob.tables["RSDP"] == BASE
    for sig, addr in blob.tables.items():
        assert addr % 16 == 0, sig
        data = table(blob, sig)
        assert checksum(data) == 0, sig
        if sig != "RSDP":
            assert data[:4] == sig.encode()
    rsdp = table(blob, "RSDP")
    assert checksum(rsdp[:20]) == 0  # the ACPI 1.0 checksum, besides the extended one above
    assert len(blob.data) % 16 == 0


def test_pointers_connect_the_tables():
    blob = slice_tables()
    rsdp = Rsdp.parse(table(blob, "RSDP"))
    assert (rsdp.signature, rsdp.revision, rsdp.rsdt_address, rsdp.length) == (b"RSD PTR ", 2, 0, 36)
    assert rsdp.oem_id == b"CSLICE"
    assert rsdp.xsdt_address == blob.tables["XSDT"]
    xsdt = table(blob, "XSDT")
    entries = struct.unpack_from("<3Q", xsdt, 36)
    assert list(entries) == [blob.tables["FACP"], blob.tables["APIC"], blob.tables["MCFG"]]
    fadt = Fadt.parse(table(blob, "FACP"))
    assert fadt.x_dsdt == blob.tables["DSDT"] and fadt.dsdt == 0
    assert table(blob, "DSDT") == build_dsdt(range(3)).aml


def test_build_is_deterministic_and_mcfg_is_optional():
    assert slice_tables() == slice_tables()
    blob = slice_tables(mcfg_allocations=())
    assert "MCFG" not in blob.tables
    xsdt = table(blob, "XSDT")
    assert len(xsdt) == 36 + 2 * 8
    assert list(struct.unpack_from("<2Q", xsdt, 36)) == [blob.tables["FACP"], blob.tables["APIC"]]


@pytest.mark.parametrize("overrides, message", [
    (dict(apic_ids=[]), "empty"),
    (dict(apic_ids=[2, 4, 2]), "listed twice"),
    (dict(apic_ids=[0, 2]), "host's boot CPU"),
    (dict(apic_ids=[0xFFFFFFFF]), "out of range"),
    (dict(dsdt_aml=b"SSDT" + bytes(40)), "not a DSDT"),
    (dict(dsdt_aml=build_dsdt([0]).aml[:-1]), "Length"),
    (dict(dsdt_aml=build_dsdt([0]).aml + b"\0"), "complete"),
    (dict(dsdt_aml=build_dsdt([0]).aml[:-1] + b"\1"), "checksum"),
    (dict(mcfg_allocations=[McfgAllocation(0xB0000000, 0, 5, 4)]), "start_bus"),
])
def test_bad_input_is_a_usage_error(overrides, message):
    with pytest.raises(UsageError, match=message):
        slice_tables(**overrides)


def test_base_must_be_16_aligned():
    with pytest.raises(UsageError, match="aligned"):
        build_slice_tables(BASE + 8, apic_ids=[1], host_bsp_apic_id=0, dsdt_aml=build_dsdt([0]).aml)


# --- iasl -d on each built table -------------------------------------------------------------
# iasl 20200925 cannot load a standalone RSDP ("does not contain a valid ACPI table": its loader
# reads an SdtHeader); the RSDP is checked field by field in test_pointers_connect_the_tables.

def test_iasl_disassembles_the_xsdt():
    blob = slice_tables()
    dsl = acpica.disassemble(table(blob, "XSDT"))
    addrs = re.findall(r"ACPI Table Address\s+\d : (\S+)", dsl)
    assert [int(a, 16) for a in addrs] == [blob.tables[s] for s in ("FACP", "APIC", "MCFG")]


def test_iasl_disassembles_the_fadt_as_hardware_reduced():
    blob = slice_tables()
    dsl = acpica.disassemble(table(blob, "FACP"))
    assert field(dsl, "Revision") == ["06"]
    assert field(dsl, "FADT Minor Revision") == ["05"]
    assert re.search(r"Hardware Reduced \(V5\) : 1", dsl)
    assert re.search(r"Legacy Devices Supported \(V2\) : 0", dsl)
    assert re.search(r"8042 Present on ports 60/64 \(V2\) : 0", dsl)
    assert re.search(r"CMOS RTC Not Present \(V5\) : 1", dsl)
    assert field(dsl, "SCI Interrupt") == ["0000"]
    assert field(dsl, "PM1A Event Block Address") == ["00000000"]
    assert field(dsl, "FACS Address") == ["00000000", "0000000000000000"]
    assert field(dsl, "DSDT Address") == ["00000000", f"{blob.tables['DSDT']:016X}"]


def test_iasl_disassembles_the_madt():
    dsl = acpica.disassemble(table(slice_tables(), "APIC"))
    assert field(dsl, "Revision") == ["05"]
    assert field(dsl, "Local Apic Address") == ["FEE00000"]
    assert re.search(r"PC-AT Compatibility : 0", dsl)
    # §5.2.12.12: APIC IDs below 255 get Processor Local APIC entries (type 0).
    assert field(dsl, "Subtable Type") == ["00"] * 4
    assert field(dsl, "Local Apic ID") == ["00", "02", "04", "06"]
    # Host BSP first: Online Capable (bit 1) only; then the slice's CPUs, Enabled (bit 0).
    assert field(dsl, "Flags (decoded below)")[1:] == ["00000002", "00000001", "00000001", "00000001"]
    assert field(dsl, "Processor ID") == [f"{HOST_BSP_LAPIC_UID:02X}", "00", "01", "02"]


def test_iasl_madt_entry_type_follows_the_apic_id():
    """Type 0 below 255, type 9 from 255 on (§5.2.12.12), in the order given, host BSP first."""
    madt = build_madt([2, 300, 254, 255], host_bsp_apic_id=0x100)
    dsl = acpica.disassemble(madt)
    assert field(dsl, "Subtable Type") == ["09", "00", "09", "00", "09"]
    assert field(dsl, "Processor x2Apic ID") == ["00000100", "0000012C", "000000FF"]
    assert field(dsl, "Processor UID") == [f"{HOST_BSP_UID:08X}", "00000001", "00000003"]
    assert field(dsl, "Local Apic ID") == ["02", "FE"]
    assert field(dsl, "Processor ID") == ["00", "02"]
    assert field(dsl, "Flags (decoded below)")[1:] == ["00000002"] + ["00000001"] * 4


@pytest.mark.parametrize("apic_ids, host_bsp", [([2, 4, 6], 0), ([0x100, 3, 0x1FF, 254], 255), ([7, 300], 1)])
def test_iasl_dsdt_processors_match_the_madt_uids(apic_ids, host_bsp):
    """Every enabled MADT processor has the UID of one DSDT processor device, and the host BSP's
    placeholder UID belongs to none (iasl -d of both tables)."""
    blob = slice_tables(apic_ids=apic_ids, host_bsp_apic_id=host_bsp, dsdt_aml=build_dsdt(range(len(apic_ids))).aml)
    madt = acpica.disassemble(table(blob, "APIC"))
    by_offset = {}  # entry offset -> (type, UID, enabled), in table order
    for m in re.finditer(r"\[(\w+)h \d+ +\d\]\s+Subtable Type : (\w+)", madt):
        by_offset[int(m[1], 16)] = m[2]
    uids = [int(u, 16) for u in re.findall(r"\](?:\s+Processor ID| +Processor UID) : (\w+)", madt)]
    enabled = [e == "1" for e in re.findall(r"Processor Enabled : (\d)", madt)]
    assert len(uids) == len(enabled) == len(by_offset) == len(apic_ids) + 1
    dsdt = acpica.disassemble(table(blob, "DSDT"))
    aml_int = {"Zero": 0, "One": 1}  # how iasl writes those two constants
    dsdt_uids = [aml_int[u] if u in aml_int else int(u, 0)
                 for u in re.findall(r'Name \(_UID, (\w+)\)', dsdt)]
    assert sorted(u for u, on in zip(uids, enabled) if on) == sorted(dsdt_uids) == list(range(len(apic_ids)))
    assert not enabled[0] and uids[0] not in dsdt_uids
    types = list(by_offset.values())
    assert types == ["00" if a < 255 else "09" for a in (host_bsp, *apic_ids)]


@pytest.mark.parametrize("apic_ids, host_bsp, message", [
    ([0x100 + i for i in range(256)] + [5], 0x300, "slice CPU 256 .APIC ID 5. needs a Local APIC entry"),
    ([0x100 + i for i in range(256)], 0, "needs UID 0xff, the host boot CPU's placeholder"),
])
def test_madt_uids_that_do_not_fit_8_bits_are_refused(apic_ids, host_bsp, message):
    with pytest.raises(UsageError, match=message):
        build_madt(apic_ids, host_bsp)
    build_madt(apic_ids[:255], host_bsp)  # one fewer CPU each: fits


def test_iasl_disassembles_the_mcfg():
    dsl = acpica.disassemble(table(slice_tables(), "MCFG"))
    assert field(dsl, "Base Address") == ["00000000B0000000"]
    assert field(dsl, "Segment Group Number") == ["0000"]
    assert field(dsl, "Start Bus Number") == ["20"]
    assert field(dsl, "End Bus Number") == ["2B"]


def test_iasl_disassembles_the_dsdt():
    dsl = acpica.disassemble(table(slice_tables(), "DSDT"))
    assert re.findall(r"Device \((C\w+)\)", dsl) == ["C000", "C001", "C002"]


def test_disassemble_rejects_a_bad_checksum():
    madt = bytearray(build_madt([1], 0))
    madt[-1] ^= 1
    with pytest.raises(acpica.AcpicaError, match="checksum"):
        acpica.disassemble(bytes(madt))


# --- MADT ------------------------------------------------------------------------------------

def test_madt_round_trip():
    madt = parse_madt(build_madt([5, 3, 0x1000, 9], host_bsp_apic_id=1))
    assert madt.local_apic_address == 0xFEE00000 and madt.flags == 0
    got = [(p.kind, p.uid, p.apic_id, p.enabled, p.online_capable) for p in madt.processors]
    assert got == [
        ("lapic", HOST_BSP_LAPIC_UID, 1, False, True),
        ("lapic", 0, 5, True, False),
        ("lapic", 1, 3, True, False),
        ("x2apic", 2, 0x1000, True, False),
        ("lapic", 3, 9, True, False),
    ]
    madt = parse_madt(build_madt([5], host_bsp_apic_id=0x1000))
    assert [(p.kind, p.uid, p.apic_id) for p in madt.processors] == [("x2apic", HOST_BSP_UID, 0x1000),
                                                                      ("lapic", 0, 5)]


def _header(sig: bytes, body: bytes, revision: int = 1) -> bytes:
    """An SDT built by hand with struct, independent of the ctypes layouts under test."""
    raw = bytearray(struct.pack("<4sIBB6s8sI4sI", sig, 36 + len(body), revision, 0, b"HOST  ",
                                b"HOSTTBL ", 1, b"TEST", 1) + body)
    raw[9] = -sum(raw) & 0xFF
    return bytes(raw)


def host_madt() -> bytes:
    """A host-like MADT mixing Local APIC (0), IOAPIC (1), ISO (2), LAPIC NMI (4), x2APIC (9)."""
    entries = b"".join([
        struct.pack("<BBBBI", 0, 8, 0, 0, 1),                 # UID 0, APIC 0, enabled
        struct.pack("<BBBBII", 1, 12, 8, 0, 0xFEC00000, 0),   # IOAPIC 8 at 0xfec00000, GSI 0
        struct.pack("<BBBBIH", 2, 10, 0, 0, 2, 0),            # ISO: IRQ0 -> GSI2
        struct.pack("<BBBBI", 0, 8, 1, 2, 0),                 # UID 1, APIC 2, disabled
        struct.pack("<BBBHB", 4, 6, 0xFF, 5, 1),              # LAPIC NMI, all CPUs, LINT1
        struct.pack("<BBBBI", 0, 8, 2, 4, 2),                 # UID 2, APIC 4, online capable
        struct.pack("<BBHIII", 9, 16, 0, 0x100, 1, 300),      # x2APIC 0x100, UID 300, enabled
    ])
    return _header(b"APIC", struct.pack("<II", 0xFEE00000, 1) + entries, revision=5)


def test_parse_madt_mixes_local_apic_and_x2apic_entries():
    raw = host_madt()
    acpica.disassemble(raw)  # the hand-built table is itself well formed
    madt = parse_madt(raw + b"trailing bytes past Length are ignored")
    assert madt.local_apic_address == 0xFEE00000 and madt.flags == 1
    got = [(p.kind, p.uid, p.apic_id, p.enabled, p.online_capable) for p in madt.processors]
    assert got == [
        ("lapic", 0, 0, True, False),
        ("lapic", 1, 2, False, False),
        ("lapic", 2, 4, False, True),
        ("x2apic", 300, 0x100, True, False),
    ]


@pytest.mark.parametrize("raw, message", [
    (b"APIC", "truncated"),
    (_header(b"FACP", bytes(8)), "expected a APIC"),
    (_header(b"APIC", bytes(8))[:-1], "out of range"),
    (_header(b"APIC", bytes(8) + bytes([0, 0])), "bad length 0"),
    (_header(b"APIC", bytes(8) + bytes([9, 20])), "bad length 20"),
    (_header(b"APIC", bytes(8) + struct.pack("<BBBBH", 0, 6, 0, 0, 1)), "needs 8"),
])
def test_parse_madt_rejects_malformed_tables(raw, message):
    with pytest.raises(AcpiFormatError, match=message) as exc:
        parse_madt(raw)
    assert exc.value.exit_code == 2 and "\n" not in str(exc.value)


def test_a_malformed_host_madt_reaches_the_cli_as_one_line(tmp_path, bzimage, capsys):
    host = make_host_tree(tmp_path / "host")
    (host / "sys/firmware/acpi/tables/APIC").write_bytes(_header(b"APIC", bytes(8) + bytes([0, 0])))
    rc = cli.main(["boot", "--kernel", str(bzimage), "--cpus", "1-2", "--memory", "512M@0x40000000",
                   "--console", "io:0x2f8", "--host-root", str(host), "--dry-run", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "MADT entry type 0 at offset 0x2c has bad length 0" in err
    assert not (tmp_path / "out").exists()


# --- MCFG ------------------------------------------------------------------------------------

def test_mcfg_round_trip():
    allocs = [McfgAllocation(0xE0000000, 0, 0, 0xFF), McfgAllocation(0x3F0000000000, 1, 0x80, 0x8B)]
    assert parse_mcfg(build_mcfg(allocs)) == allocs


def test_parse_mcfg_of_a_hand_built_table():
    alloc = struct.Struct("<QHBBI")  # base, segment, start bus, end bus, reserved
    body = bytes(8) + alloc.pack(0xB0000000, 0, 0, 0xFF, 0) + alloc.pack(1 << 40, 2, 0x10, 0x1F, 0)
    raw = _header(b"MCFG", body)
    acpica.disassemble(raw)
    assert parse_mcfg(raw) == [McfgAllocation(0xB0000000, 0, 0, 0xFF), McfgAllocation(1 << 40, 2, 0x10, 0x1F)]


def test_parse_mcfg_rejects_a_partial_allocation():
    with pytest.raises(AcpiFormatError, match="multiple of 16"):
        parse_mcfg(_header(b"MCFG", bytes(8) + bytes(10)))


def test_prepared_tables_are_sized_once_and_built_anywhere():
    """The plan sizes the data area with SliceTables.size and the image lays the same encoded
    tables out at their address: the size holds at every base, and the leaves are not re-encoded."""
    from coreslice.acpi.tables import prepare_slice_tables
    t = prepare_slice_tables(apic_ids=APIC_IDS, host_bsp_apic_id=HOST_BSP, dsdt_aml=build_dsdt(range(3)).aml)
    for base in (0, 0x1000, 0x7FF0_0000):
        blob = t.at(base)
        assert len(blob.data) == t.size
        assert blob.data == build_slice_tables(base, apic_ids=APIC_IDS, host_bsp_apic_id=HOST_BSP,
                                               dsdt_aml=build_dsdt(range(3)).aml).data
    assert t.at(0x1000).data[t.at(0x1000).tables["DSDT"] - 0x1000:][:4] == b"DSDT"
