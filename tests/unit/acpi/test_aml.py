"""AML encoder, resource templates and the slice's DSDT, checked against iasl and acpiexec.

The main oracle: iasl compiling our own ASL rendering must give our AML bytes.  Table headers
differ only in Creator ID/Revision (iasl writes "INTL" and its version) and so in the checksum;
everything after the 36-byte header must be identical.
"""

import re

import pytest

from coreslice.acpi import acpica
from coreslice.acpi.aml import (
    ONES,
    Buffer,
    Caching,
    DefinitionBlock,
    Device,
    DWordMemory,
    EisaId,
    Integer,
    Method,
    Name,
    Package,
    QWordMemory,
    ResourceTemplate,
    Return,
    Scope,
    String,
    WordBusNumber,
    WordIO,
    name_string,
    pkg_length,
)
from coreslice.acpi.dsdt import PciRoot, build_dsdt, pci_root_device
from coreslice.acpi.tables import CREATOR_ID, SdtHeader, checksum
from coreslice.errors import UsageError


def assert_iasl_agrees(aml: bytes, asl: str) -> bytes:
    """Compile ``asl`` with iasl and compare with ``aml``; returns iasl's table."""
    theirs = acpica.compile_asl(asl)
    ours_hdr, theirs_hdr = SdtHeader.parse(aml), SdtHeader.parse(theirs)
    for f in ("signature", "length", "revision", "oem_id", "oem_table_id", "oem_revision"):
        assert getattr(ours_hdr, f) == getattr(theirs_hdr, f), f
    assert ours_hdr.creator_id == CREATOR_ID and theirs_hdr.creator_id == b"INTL"
    assert aml[36:] == theirs[36:]
    assert checksum(aml) == 0
    return theirs


# --- encoding rules --------------------------------------------------------------------------

@pytest.mark.parametrize("body, encoded", [
    (0, "01"),
    (0x3E, "3f"),            # largest one-byte form: 0x3E + 1 = 63
    (0x3F, "4104"),          # 0x41 = 2 bytes, low nibble 1; 0x04 = the rest (total 0x41)
    (0xFFD, "4fff"),         # largest two-byte form (total 0xFFF)
    (0xFFE, "810001"),       # total 0x1001 in three bytes
    (0xFFFFC, "8fffff"),     # largest three-byte form (total 0xFFFFF)
    (0xFFFFD, "c1000001"),   # total 0x100001 in four bytes
])
def test_pkg_length(body, encoded):
    assert pkg_length(body).hex() == encoded


def test_pkg_length_limit():
    with pytest.raises(ValueError):
        pkg_length(1 << 28)


@pytest.mark.parametrize("value, encoded, asl", [
    (0, "00", "Zero"),
    (1, "01", "One"),
    (ONES, "ff", "Ones"),
    (2, "0a02", "0x02"),
    (0xFF, "0aff", "0xFF"),
    (0x100, "0b0001", "0x0100"),
    (0xFFFF, "0bffff", "0xFFFF"),
    (0x10000, "0c00000100", "0x00010000"),
    (0xFFFFFFFF, "0cffffffff", "0xFFFFFFFF"),
    (1 << 32, "0e0000000001000000", "0x0000000100000000"),
    (ONES - 1, "0efeffffffffffffff", "0xFFFFFFFFFFFFFFFE"),
])
def test_integer_takes_the_smallest_encoding(value, encoded, asl):
    assert Integer(value).encode().hex() == encoded
    assert Integer(value).to_asl() == asl


def test_integer_range():
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError):
            Integer(bad)


@pytest.mark.parametrize("path, encoded", [
    ("C000", b"C000"),
    ("_SB", b"_SB_"),
    ("\\", b"\\\x00"),
    ("\\_SB", b"\\_SB_"),
    ("\\_SB.PCI0", b"\\\x2e_SB_PCI0"),
    ("^^FOO", b"^^FOO_"),
    ("_SB.PCI0.S08", b"\x2f\x03_SB_PCI0S08_"),
])
def test_name_string(path, encoded):
    assert name_string(path) == encoded


@pytest.mark.parametrize("path", ["0ABC", "ABCDE", "ab", "A-B", "_SB..X", "\u00c9"])
def test_name_string_rejects_bad_names(path):
    with pytest.raises(ValueError):
        name_string(path)


def test_eisa_id():
    pnp0a08 = EisaId("PNP0A08")
    assert pnp0a08.value == 0x080AD041  # the well-known compressed form
    assert pnp0a08.encode().hex() == "0c41d00a08"
    assert pnp0a08.to_asl() == 'EisaId ("PNP0A08")'
    assert EisaId("PNP0000").encode().hex() == "0b41d0"  # smallest prefix, as iasl does
    for bad in ("PNP0A0", "pnp0A08", "PNP0A0G"):
        with pytest.raises(ValueError):
            EisaId(bad)


def test_method_returning_a_constant():
    sta = Method("_STA", Return(0x0F))
    assert sta.encode().hex() == "14" "09" "5f535441" "00" "a4" "0a0f"
    assert sta.to_asl() == "Method (_STA, 0, NotSerialized)\n{\n    Return (0x0F)\n}"
    # MethodFlags: ArgCount in bits 2-0, SerializeFlag in bit 3.
    assert Method("MTH1", args=2, serialized=True).encode().hex() == "14" "06" "4d544831" "0a"
    with pytest.raises(ValueError):
        Method("MTH2", args=8)


def test_string_and_buffer():
    assert String("ACPI0007").encode() == b"\x0dACPI0007\x00"
    assert String('a"b\\c').to_asl() == '"a\\"b\\\\c"'
    assert Buffer(b"\x01\x02").encode().hex() == "11" "05" "0a02" "0102"
    with pytest.raises(ValueError):
        String("nul\0")


def test_device_opcode():
    assert Device("C000").encode().hex() == "5b82" "05" "43303030"
    assert Scope("_SB").encode().hex() == "10" "05" "5f53425f"


# --- our ASL compiles with iasl to our AML ---------------------------------------------------

def test_every_term_matches_iasl():
    block = DefinitionBlock(
        "DSDT",
        Name("INTS", Package([0, 1, ONES, 2, 0x1234, 0x12345678, 0x123456789ABCDEF0])),
        Name("STR0", "hello, \"world\" \\ path"),
        Name("BUF0", Buffer(bytes(range(70)))),     # PkgLength needs two bytes
        Name("NEST", Package(["a", [1, [2, "b"]], Buffer(b"")])),
        Name("EID0", EisaId("PNP0C02")),
        Name("EID1", EisaId("PNP0000")),
        Scope(
            "_SB",
            Device("DEV0", Name("_HID", EisaId("PNP0A08")), Method("_STA", Return(0x0F))),
            Device("DEV1", Name("_ADR", 0x1F0003), Method("MTH1", Return("str"), serialized=True)),
            # > 4 KiB of body: a three-byte PkgLength
            Device("BIG0", Name("_ADR", 0), *[Name(f"N{i:03X}", i * 0x10001) for i in range(600)]),
        ),
        # Not "\\_SB.DEV0": iasl drops a root prefix that is redundant at the top level (namepath
        # optimisation); the root prefix itself is covered by test_name_string.
        Scope("_SB.DEV0", Name("XTRA", 1)),
    )
    aml = block.encode()
    assert len(aml) > 0x1000
    assert_iasl_agrees(aml, block.to_asl())


# --- resource templates ----------------------------------------------------------------------

# The PNP0A08 example of /work/shared/reference/sliceloader-x64-README.txt (root bus 0x20), as its
# authors wrote it, except that the 64-bit window uses QWordMemory where they used
# ExtendedMemory: an independent ASL source for the same windows.
README_PCI0 = """
DefinitionBlock ("", "DSDT", 2, "CSLICE", "CORESLIC", 0x00000001)
{
  Scope (_SB)
  {
    Device(PC00)
    {
      Name(_HID, EisaId("PNP0A08"))
      Name(_CID, EisaId("PNP0A03"))
      Name(_SEG, 0)
      Name(_BBN, 0x20)
      Name(_UID, 0)
      Name(_CRS, ResourceTemplate() {
        WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,
            0x0000,             // Granularity
            0x0020,             // Range Minimum
            0x002B,             // Range Maximum
            0x0000,             // Translation Offset
            0x000C)             // Length
        WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,
            0x00000000,         // Granularity
            0x00006000,         // Range Minimum
            0x00007FFF,         // Range Maximum
            0x00000000,         // Translation Offset
            0x00002000,         // Length
            ,, , TypeStatic, DenseTranslation)
        DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
            0x00000000,         // Granularity
            0xab000000,         // Range Minimum
            0xb87fffff,         // Range Maximum
            0x00000000,         // Translation Offset
            0x0d800000,         // Length
            ,, , AddressRangeMemory, TypeStatic)
        QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
            0x0,
            0x388000000000,
            0x38bfffffffff,
            0x0,
            0x4000000000
            ,,,)
      })
    }
  }
}
"""

README_ROOT = PciRoot(bus_start=0x20, bus_end=0x2B, io=((0x6000, 0x7FFF),),
                      mem=((0xAB000000, 0xB87FFFFF), (0x388000000000, 0x38BFFFFFFFFF)))


def test_pci_root_matches_iasl_and_the_readme_example():
    dsdt = build_dsdt([0], pci_roots=[README_ROOT])
    assert "Device (PC00)" in dsdt.asl and "QWordMemory" in dsdt.asl
    assert_iasl_agrees(dsdt.aml, dsdt.asl)
    # The same device compiled from the README's hand-written ASL.
    ours = DefinitionBlock("DSDT", Scope("_SB", pci_root_device(0, README_ROOT))).encode()
    assert acpica.compile_asl(README_PCI0)[36:] == ours[36:]


def test_acpiexec_decodes_the_pci_root():
    dsdt = build_dsdt([0, 1], pci_roots=[README_ROOT])
    out = acpica.acpiexec(dsdt.aml, r"evaluate \_SB.PC00._HID", r"evaluate \_SB.PC00._BBN",
                          r"evaluate \_SB.PC00._CRS", r"resources \_SB.PC00")
    assert "[Integer] = 00000000080AD041" in out
    assert "[Integer] = 0000000000000020" in out
    decoded = out[out.index("Address Space Resource"):]
    mins = re.findall(r"Address Minimum : (\w+)", decoded)
    maxs = re.findall(r"Address Maximum : (\w+)", decoded)
    lens = re.findall(r"Address Length : (\w+)", decoded)
    assert mins[:4] == ["0020", "6000", "AB000000", "0000388000000000"]
    assert maxs[:4] == ["002B", "7FFF", "B87FFFFF", "000038BFFFFFFFFF"]
    assert lens[:4] == ["000C", "2000", "0D800000", "0000004000000000"]
    assert decoded.count("ResourceProducer") >= 4


def test_descriptor_bytes():
    # §6.4.3.5.3 Word Address Space Descriptor for buses 0x20-0x2b, producer, MIF|MAF.
    assert WordBusNumber(0x20, 0x2B).encode().hex() == "880d00" "02" "0c" "00" "0000" "2000" "2b00" "0000" "0c00"
    assert WordIO(0x6000, 0x7FFF).encode()[3:6].hex() == "010c03"  # I/O, MIF|MAF, EntireRange
    mem = DWordMemory(0, 0xFFF, producer=False, caching=Caching.PREFETCHABLE, read_write=False)
    assert mem.encode()[:6].hex() == "871700" "00" "0d" "06"  # consumer bit, _MEM = 3
    assert len(QWordMemory(0, 1).encode()) == 3 + 0x2B
    template = ResourceTemplate(WordBusNumber(0, 0xFF))
    assert template.encode()[-2:] == b"\x79\x00"  # End Tag, checksum 0 (§6.4.2.9)


def test_descriptor_asl_variants_compile():
    crs = ResourceTemplate(
        WordBusNumber(0, 0xFF, producer=False),
        DWordMemory(0xFED00000, 0xFED003FF, producer=False, caching=Caching.CACHEABLE, read_write=False),
        QWordMemory(1 << 40, (1 << 41) - 1, caching=Caching.WRITE_COMBINING, translation=0x1000),
        DWordMemory(0x1000, 0x1FFF, caching=Caching.PREFETCHABLE),
    )
    block = DefinitionBlock("DSDT", Scope("_SB", Device("RES0", Name("_HID", "ACPI0004"), Name("_CRS", crs))))
    assert_iasl_agrees(block.encode(), block.to_asl())


@pytest.mark.parametrize("make", [
    lambda: WordBusNumber(0x2B, 0x20),          # min > max
    lambda: WordIO(0x8000, 0x10000),            # past 16 bits
    lambda: WordIO(0, 0xFFFF),                  # length 0x10000 does not fit the Length field
    lambda: DWordMemory(0, 1 << 32),
    lambda: QWordMemory(0, 1, translation=1 << 64),
])
def test_descriptor_rejects_windows_that_do_not_fit(make):
    with pytest.raises(ValueError):
        make()


# --- the slice's DSDT ------------------------------------------------------------------------

def test_dsdt_processors_load_in_acpiexec():
    uids = [0, 1, 2, 0x1F]
    dsdt = build_dsdt(uids)
    assert checksum(dsdt.aml) == 0 and dsdt.aml[:4] == b"DSDT"
    cmds = [f"evaluate \\_SB.C{u:03X}.{name}" for u in uids for name in ("_UID", "_HID")]
    out = acpica.acpiexec(dsdt.aml, *cmds)
    assert re.findall(r"\[Integer\] = (\w+)", out) == [f"{u:016X}" for u in uids]
    assert out.count('[String] Length 08 = "ACPI0007"') == len(uids)


def test_dsdt_asl_compiles_to_the_same_aml():
    dsdt = build_dsdt([0, 1, 2])
    assert_iasl_agrees(dsdt.aml, dsdt.asl)
    assert "Device (C002)" in dsdt.asl and 'Name (_HID, "ACPI0007")' in dsdt.asl


def test_dsdt_disassembles():
    dsl = acpica.disassemble(build_dsdt([3, 4], pci_roots=[README_ROOT]).aml)
    assert re.findall(r"Device \((\w+)\)", dsl) == ["C003", "C004", "PC00"]
    assert "0xAB000000" in dsl and "0x0000388000000000" in dsl


@pytest.mark.parametrize("uids, message", [
    ([], "at least one"),
    ([0, 0], "unique"),
    ([0x1000], "within"),
])
def test_dsdt_rejects_bad_uids(uids, message):
    with pytest.raises(UsageError, match=message):
        build_dsdt(uids)


@pytest.mark.parametrize("root", [
    PciRoot(0, 0x1FF),
    PciRoot(0x10, 0x0F),
    PciRoot(0, 0xFF, io=((0x6000, 0x10000),)),
    PciRoot(0, 0xFF, mem=((1 << 64, 1 << 64),)),
])
def test_dsdt_rejects_a_pci_root_that_does_not_fit(root):
    with pytest.raises(UsageError, match="bad PCI root"):
        build_dsdt([0], pci_roots=[root])
