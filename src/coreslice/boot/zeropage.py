"""The zero page (struct boot_params) and its e820 map.

Layout: structs.BootParams (bootparam.h, zero-page.rst).  Only the fields a 64-bit boot needs are
written; everything else stays zero, which the kernel reads as "not provided".
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from coreslice.boot import bzimage
from coreslice.boot.structs import (
    CAN_USE_HEAP,
    E820_MAX_ENTRIES,
    HDR_AREA_END,
    HEADER_START,
    LOADED_HIGH,
    TYPE_OF_LOADER_UNDEFINED,
    ZERO_PAGE_SIZE,
    BootE820Entry,
    BootParams,
)
from coreslice.errors import UsageError

_LOW32 = 0xFFFFFFFF
SECURE_BOOT_DISABLED = 2  # efi_secureboot_mode_disabled


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
    efi_info: bytes = b"",
) -> bytes:
    """Return the 4 KiB zero page for a 64-bit entry (boot.rst "64-bit Boot Protocol").

    ``efi_info``: struct efi_info (boot/efi.py EfiFirmware.efi_info), which makes the kernel an
    EFI-booted one (zero-page.rst 0x1c0); empty for none."""
    check_e820(e820)
    # boot.rst: the kernel's own setup header, all of it (up to header_end), is the loader's
    # starting point; then it fills in the fields marked "write".  The copy stops at the end of
    # the header area (HDR_AREA_END, 0x290) even if header_end says more: past it lie other
    # boot_params fields (edd_mbr_sig_buffer, e820_table) that the kernel would read as ours.
    raw = bytearray(ZERO_PAGE_SIZE)
    hdr_bytes = kernel.header_bytes()[:HDR_AREA_END - HEADER_START]
    raw[HEADER_START:HEADER_START + len(hdr_bytes)] = hdr_bytes
    zp = BootParams.from_buffer(raw)
    hdr = zp.hdr

    hdr.type_of_loader = TYPE_OF_LOADER_UNDEFINED
    # We load the protected-mode code high and run no real-mode setup, which is the only user
    # of the heap.
    hdr.loadflags = (kernel.loadflags | LOADED_HIGH) & ~CAN_USE_HEAP
    hdr.code32_start = load_addr & _LOW32
    hdr.setup_data = 0
    # 64-bit addresses and sizes: low halves in the header, high halves in the ext_* fields.
    hdr.cmd_line_ptr, zp.ext_cmd_line_ptr = cmdline_addr & _LOW32, cmdline_addr >> 32
    hdr.ramdisk_image, zp.ext_ramdisk_image = initrd_addr & _LOW32, initrd_addr >> 32
    hdr.ramdisk_size, zp.ext_ramdisk_size = initrd_size & _LOW32, initrd_size >> 32
    zp.acpi_rsdp_addr = rsdp_addr
    if efi_info:
        if len(efi_info) != len(zp.efi_info):
            raise UsageError(f"efi_info is {len(efi_info)} bytes, boot_params holds {len(zp.efi_info)}")
        zp.efi_info[:] = efi_info
        # zero-page.rst 0x1ec secure_boot, enum efi_secureboot_mode (include/linux/efi.h):
        # 2 = disabled.  Left 0 ("unset"), an EFI-booted kernel warns it cannot tell.
        zp.secure_boot = SECURE_BOOT_DISABLED

    zp.e820_entries = len(e820)
    for i, entry in enumerate(sorted(e820, key=lambda e: e.addr)):
        zp.e820_table[i] = BootE820Entry(entry.addr, entry.size, int(entry.type))
    assert zp.sentinel == 0  # the header copy starts after it; see structs.BootParams
    del zp, hdr  # release the view of raw before copying it out
    return bytes(raw)
