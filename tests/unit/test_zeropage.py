"""Zero page offsets (bootparam.h) and the e820 table."""

from __future__ import annotations

import struct

import pytest

from coreslice.boot import bzimage, zeropage
from coreslice.boot.zeropage import E820Entry, E820Type
from coreslice.errors import UsageError

E820 = [
    E820Entry(0x28000, 0x8000, E820Type.RAM),
    E820Entry(0x20000, 0x8000, E820Type.RESERVED),
    E820Entry(0x40000000, 0x3FFF0000, E820Type.RAM),
    E820Entry(0x7FFF0000, 0x10000, E820Type.RESERVED),
]


@pytest.fixture(scope="module")
def zp(debian_kernel):
    k = bzimage.parse_bzimage(debian_kernel.vmlinuz)
    page = zeropage.build_zero_page(k, load_addr=0x40000000, cmdline_addr=0x1_7FFF1000,
                                    initrd_addr=0x1_2345_6000, initrd_size=0x1_0000_1000,
                                    rsdp_addr=0x7FFF2000, e820=E820)
    return k, page


def test_offsets_match_bootparam_h(zp):
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
    assert page[0x211] & bzimage.LOADED_HIGH
    assert page[0x202:0x206] == b"HdrS"
    # The rest of the header is the kernel's own.
    for name in ("version", "xloadflags", "init_size", "kernel_alignment", "cmdline_size"):
        assert bzimage.get_field(page, name) == bzimage.get_field(k.setup, name)


def test_e820_sorted(zp):
    _, page = zp
    entries = [struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) for i in range(4)]
    assert entries == [(0x20000, 0x8000, 2), (0x28000, 0x8000, 1), (0x40000000, 0x3FFF0000, 1),
                       (0x7FFF0000, 0x10000, 2)]
    assert page[0x2D0 + 20 * 4:0x2D0 + 20 * 5] == bytes(20)


def test_overlapping_e820_refused(debian_kernel):
    k = bzimage.parse_bzimage(debian_kernel.vmlinuz)
    with pytest.raises(UsageError, match="overlap"):
        zeropage.build_zero_page(k, load_addr=0, cmdline_addr=0, initrd_addr=0, initrd_size=0, rsdp_addr=0,
                                 e820=[E820Entry(0, 0x2000, E820Type.RAM), E820Entry(0x1000, 0x1000, E820Type.RAM)])
