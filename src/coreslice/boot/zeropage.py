"""The zero page (struct boot_params) and its e820 map.

Layout: arch/x86/include/uapi/asm/bootparam.h and Documentation/arch/x86/zero-page.rst.  Only the
fields a 64-bit boot needs are written; everything else stays zero, which the kernel reads as
"not provided".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from coreslice.boot import bzimage
from coreslice.errors import UsageError

ZERO_PAGE_SIZE = 0x1000

# zero-page.rst offsets
ACPI_RSDP_ADDR = 0x070
EXT_RAMDISK_IMAGE = 0x0C0
EXT_RAMDISK_SIZE = 0x0C4
EXT_CMD_LINE_PTR = 0x0C8
E820_ENTRIES = 0x1E8
SENTINEL = 0x1EF          # must stay 0, or the kernel wipes fields it thinks a loader forgot
E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128    # E820_MAX_ENTRIES_ZEROPAGE
E820_ENTRY = struct.Struct("<QQI")  # struct boot_e820_entry: addr, size, type

# boot.rst "type_of_loader": 0xff means "undefined loader".
TYPE_OF_LOADER_UNDEFINED = 0xFF


class E820Type(IntEnum):
    """ACPI 6.5 §15.3 (Address Range Types), as used by the e820 map."""

    RAM = 1
    RESERVED = 2
    ACPI = 3
    NVS = 4
    UNUSABLE = 5


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: E820Type

    @property
    def end(self) -> int:
        return self.addr + self.size

    def to_json(self) -> dict:
        return {"addr": self.addr, "size": self.size, "type": self.type.name.lower()}


def check_e820(entries: list[E820Entry]) -> None:
    if len(entries) > E820_MAX_ENTRIES:
        raise UsageError(f"e820 map has {len(entries)} entries, the zero page holds {E820_MAX_ENTRIES}")
    ordered = sorted(entries, key=lambda e: e.addr)
    for a, b in zip(ordered, ordered[1:]):
        if a.end > b.addr:
            raise UsageError(f"e820 entries overlap: 0x{a.addr:x}+0x{a.size:x} and 0x{b.addr:x}")


def build_zero_page(
    kernel: bzimage.BzImage,
    *,
    load_addr: int,
    cmdline_addr: int,
    initrd_addr: int,
    initrd_size: int,
    rsdp_addr: int,
    e820: list[E820Entry],
) -> bytes:
    """Return the 4 KiB zero page for a 64-bit entry (boot.rst "64-bit Boot Protocol")."""
    check_e820(e820)
    zp = bytearray(ZERO_PAGE_SIZE)
    hdr = kernel.header_bytes()
    zp[bzimage.HEADER_START:bzimage.HEADER_START + len(hdr)] = hdr

    bzimage.set_field(zp, "type_of_loader", TYPE_OF_LOADER_UNDEFINED)
    bzimage.set_field(zp, "loadflags", (kernel.loadflags | bzimage.LOADED_HIGH) & ~bzimage.CAN_USE_HEAP)
    bzimage.set_field(zp, "code32_start", load_addr & 0xFFFFFFFF)
    bzimage.set_field(zp, "cmd_line_ptr", cmdline_addr & 0xFFFFFFFF)
    bzimage.set_field(zp, "ramdisk_image", initrd_addr & 0xFFFFFFFF)
    bzimage.set_field(zp, "ramdisk_size", initrd_size & 0xFFFFFFFF)
    bzimage.set_field(zp, "setup_data", 0)
    struct.pack_into("<I", zp, EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    struct.pack_into("<I", zp, EXT_RAMDISK_IMAGE, initrd_addr >> 32)
    struct.pack_into("<I", zp, EXT_RAMDISK_SIZE, initrd_size >> 32)
    struct.pack_into("<Q", zp, ACPI_RSDP_ADDR, rsdp_addr)

    zp[E820_ENTRIES] = len(e820)
    for i, entry in enumerate(sorted(e820, key=lambda e: e.addr)):
        E820_ENTRY.pack_into(zp, E820_TABLE + i * E820_ENTRY.size, entry.addr, entry.size, int(entry.type))
    assert zp[SENTINEL] == 0
    return bytes(zp)
