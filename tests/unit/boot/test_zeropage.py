"""Zero page offsets (bootparam.h) and the e820 table."""

from __future__ import annotations

import ctypes
import dataclasses
import struct

import pytest

from coreslice.boot import bzimage as bz, zeropage  # the name bzimage is the fixture's
from coreslice.boot.structs import BootE820Entry, BootParams
from coreslice.boot.zeropage import E820Entry, E820Type
from coreslice.errors import UsageError

from ..bzimage_fixture import write_bzimage

E820 = [
    E820Entry(0x28000, 0x8000, E820Type.RAM),
    E820Entry(0x20000, 0x8000, E820Type.RESERVED),
    E820Entry(0x40000000, 0x3FFF0000, E820Type.RAM),
    E820Entry(0x7FFF0000, 0x10000, E820Type.RESERVED),
]


# arch/x86/include/uapi/asm/bootparam.h / zero-page.rst: (field, offset) of what we write or check.
BOOTPARAM_H = [
    ("acpi_rsdp_addr", 0x070), ("ext_ramdisk_image", 0x0C0), ("ext_ramdisk_size", 0x0C4),
    ("ext_cmd_line_ptr", 0x0C8), ("e820_entries", 0x1E8), ("sentinel", 0x1EF), ("hdr", 0x1F1),
    ("edd_mbr_sig_buffer", 0x290), ("e820_table", 0x2D0), ("eddbuf", 0xD00),
]


def test_declaration_matches_bootparam_h():
    assert [(name, getattr(BootParams, name).offset) for name, _ in BOOTPARAM_H] == BOOTPARAM_H
    assert ctypes.sizeof(BootParams) == zeropage.ZERO_PAGE_SIZE == 0x1000
    assert BootParams.e820_table.size == 128 * 20 == zeropage.E820_MAX_ENTRIES * ctypes.sizeof(BootE820Entry)
    assert [(n, getattr(BootE820Entry, n).offset) for n in ("addr", "size", "type")] == [
        ("addr", 0), ("size", 8), ("type", 16)]


@pytest.fixture(scope="module")
def zp(bzimage):
    k = bz.parse_bzimage(bzimage)
    page = zeropage.build_zero_page(k, load_addr=0x40000000, cmdline_addr=0x1_7FFF1000,
                                    initrd_addr=0x1_2345_6000, initrd_size=0x1_0000_1000,
                                    rsdp_addr=0x7FFF2000, e820=E820)
    return k, page


def test_page_bytes_at_bootparam_h_offsets(zp):
    # struct boot_params: acpi_rsdp_addr @0x70, ext_ramdisk_image @0xc0, ext_ramdisk_size @0xc4,
    # ext_cmd_line_ptr @0xc8, e820_entries @0x1e8, hdr @0x1f1, e820_table @0x2d0.
    k, page = zp
    assert len(page) == 4096
    assert struct.unpack_from("<Q", page, 0x70)[0] == 0x7FFF2000
    assert struct.unpack_from("<I", page, 0xC8)[0] == 0x1             # cmdline high half
    assert struct.unpack_from("<I", page, 0x228)[0] == 0x7FFF1000     # cmd_line_ptr low half
    assert struct.unpack_from("<I", page, 0xC0)[0] == 0x1             # initrd high half
    assert struct.unpack_from("<I", page, 0x218)[0] == 0x23456000
    assert struct.unpack_from("<I", page, 0xC4)[0] == 0x1             # size high half
    assert struct.unpack_from("<I", page, 0x21C)[0] == 0x1000
    assert page[0x1E8] == 4
    assert page[0x1EF] == 0                                           # sentinel
    assert page[0x210] == 0xFF                                        # type_of_loader
    assert page[0x211] & bz.LOADED_HIGH and not page[0x211] & bz.CAN_USE_HEAP
    assert struct.unpack_from("<I", page, 0x214)[0] == 0x40000000     # code32_start
    assert page[0x202:0x206] == b"HdrS"
    # The rest of the header is the kernel's own.
    for name in ("version", "xloadflags", "init_size", "kernel_alignment", "cmdline_size"):
        assert bz.get_field(page, name) == bz.get_field(k.setup, name)


def test_e820_sorted(zp):
    _, page = zp
    entries = [struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) for i in range(4)]
    assert entries == [(0x20000, 0x8000, 2), (0x28000, 0x8000, 1), (0x40000000, 0x3FFF0000, 1),
                       (0x7FFF0000, 0x10000, 2)]
    assert page[0x2D0 + 20 * 4:0x2D0 + 20 * 5] == bytes(20)


def test_a_longer_header_is_copied_whole(tmp_path):
    k = bz.parse_bzimage(write_bzimage(tmp_path / "k", header_extra=8))
    page = zeropage.build_zero_page(k, load_addr=0x40000000, cmdline_addr=0x1000, initrd_addr=0, initrd_size=0,
                                    rsdp_addr=0, e820=E820)
    assert page[0x26C:0x274] == b"\xA5" * 8 and page[0x274:0x290] == bytes(0x1C)


def test_a_2_13_header_is_copied_without_the_setup_code_after_it(tmp_path):
    k = bz.parse_bzimage(write_bzimage(tmp_path / "k", protocol=0x020D, version_string="5.4.0 #1"))
    assert k.setup[0x268:0x26C] == b"\x5A" * 4  # setup code where 2.15 has kernel_info_offset
    page = zeropage.build_zero_page(k, load_addr=0x40000000, cmdline_addr=0x1000, initrd_addr=0, initrd_size=0,
                                    rsdp_addr=0, e820=E820)
    assert page[0x202:0x206] == b"HdrS" and page[0x264:0x268] == k.setup[0x264:0x268]
    assert page[0x268:0x290] == bytes(0x28)


def test_the_header_copy_stops_at_the_end_of_the_header_area(tmp_path):
    """However long the kernel says its header is, the copy never reaches edd_mbr_sig_buffer (0x290)
    or the e820 table after it."""
    k = bz.parse_bzimage(write_bzimage(tmp_path / "k", header_extra=8))
    setup = bytearray(k.setup)
    setup[0x26C:0x300] = b"\xA5" * (0x300 - 0x26C)
    long = dataclasses.replace(k, setup=bytes(setup), header_end=0x300)
    page = zeropage.build_zero_page(long, load_addr=0x40000000, cmdline_addr=0x1000, initrd_addr=0, initrd_size=0,
                                    rsdp_addr=0, e820=E820[:1])
    assert page[0x26C:0x290] == b"\xA5" * (0x290 - 0x26C)
    assert page[0x290:0x2D0] == bytes(0x40)                            # edd_mbr_sig_buffer
    assert struct.unpack_from("<QQI", page, 0x2D0) == (0x28000, 0x8000, 1)  # e820_table[0]
    assert page[0x2D0 + 20:0x300] == bytes(0x300 - 0x2D0 - 20)


def test_overlapping_e820_refused(bzimage):
    k = bz.parse_bzimage(bzimage)
    with pytest.raises(UsageError, match="overlap"):
        zeropage.build_zero_page(k, load_addr=0, cmdline_addr=0, initrd_addr=0, initrd_size=0, rsdp_addr=0,
                                 e820=[E820Entry(0, 0x2000, E820Type.RAM), E820Entry(0x1000, 0x1000, E820Type.RAM)])


def test_boot_and_acpi_layouts_share_one_packed_base():
    """One packed little-endian base (coreslice.cstruct); each family raises its own error, and
    e820's ``size`` field does not collide with the base's sizeof()."""
    from coreslice.acpi.errors import AcpiFormatError
    from coreslice.acpi.tables import SdtHeader
    from coreslice.boot.errors import BootFormatError
    from coreslice.cstruct import PackedStruct

    assert issubclass(BootParams, PackedStruct) and issubclass(SdtHeader, PackedStruct)
    assert BootE820Entry.sizeof() == 20 and BootE820Entry(1, 2, 3).size == 2
    with pytest.raises(BootFormatError, match="truncated"):
        BootE820Entry.parse(bytes(19))
    with pytest.raises(AcpiFormatError, match="truncated"):
        SdtHeader.parse(bytes(35))
