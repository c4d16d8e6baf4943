"""Binary layouts of the Linux x86 boot protocol, each declared once.

Sources: Documentation/arch/x86/boot.rst ("The Real-Mode Kernel Header", "Details of Header
Fields") for the setup header; arch/x86/include/uapi/asm/bootparam.h and
Documentation/arch/x86/zero-page.rst for struct boot_params (the zero page) and its e820 table.

Each layout is a packed little-endian ctypes structure (coreslice.cstruct, shared with
acpi/tables.py) and serves both to parse (a bzImage's header: bzimage.py) and to build (the zero
page: zeropage.py).  Comments give each field's offset in the zero page and, for the header, the
first protocol that has it.
"""

from __future__ import annotations

import ctypes

from coreslice.boot.errors import BootFormatError
from coreslice.boot.layout import PAGE
from coreslice.cstruct import U8, U16, U32, U64, PackedStruct


class Struct(PackedStruct):
    """Boot-protocol layouts: a kernel file too short for one is a BootFormatError."""

    format_error = BootFormatError


# ---------------------------------------------------------------------------------------------
# boot.rst "The Real-Mode Kernel Header": the setup header, at 0x1f1 of both the kernel file and
# the zero page.  The kernel's copy is what the loader starts from; the fields boot.rst marks
# "write" or "modify" are the loader's to fill in (zeropage.py).

class SetupHeader(Struct):
    _fields_ = [
        ("setup_sects", U8),             # 0x1f1 ALL   setup code size in 512-byte sectors; 0 means 4
        ("root_flags", U16),             # 0x1f2 ALL
        ("syssize", U32),                # 0x1f4 2.04+ protected-mode code size, 16-byte paragraphs
        ("ram_size", U16),               # 0x1f8 ALL   obsolete
        ("vid_mode", U16),               # 0x1fa ALL
        ("root_dev", U16),               # 0x1fc ALL
        ("boot_flag", U16),              # 0x1fe ALL   BOOT_FLAG
        ("jump", U16),                   # 0x200 2.00+ short jump; its second byte ends the header
        ("header", U32),                 # 0x202 2.00+ HDRS_MAGIC
        ("version", U16),                # 0x206 2.00+ protocol, major << 8 | minor
        ("realmode_swtch", U32),         # 0x208 2.00+
        ("start_sys_seg", U16),          # 0x20c 2.00+ obsolete
        ("kernel_version", U16),         # 0x20e 2.00+ version string at this value + 0x200
        ("type_of_loader", U8),          # 0x210 2.00+ written by the loader
        ("loadflags", U8),               # 0x211 2.00+ LOADED_HIGH, CAN_USE_HEAP, ...
        ("setup_move_size", U16),        # 0x212 2.00+
        ("code32_start", U32),           # 0x214 2.00+ 32-bit entry; written by the loader
        ("ramdisk_image", U32),          # 0x218 2.00+ initrd address, low 32 bits
        ("ramdisk_size", U32),           # 0x21c 2.00+ initrd size, low 32 bits
        ("bootsect_kludge", U32),        # 0x220 2.00+ obsolete
        ("heap_end_ptr", U16),           # 0x224 2.01+
        ("ext_loader_ver", U8),          # 0x226 2.02+
        ("ext_loader_type", U8),         # 0x227 2.02+
        ("cmd_line_ptr", U32),           # 0x228 2.02+ command line address, low 32 bits
        ("initrd_addr_max", U32),        # 0x22c 2.03+ highest address the initrd may occupy
        ("kernel_alignment", U32),       # 0x230 2.05+ alignment a relocatable kernel needs
        ("relocatable_kernel", U8),      # 0x234 2.05+ nonzero: may load at any such alignment
        ("min_alignment", U8),           # 0x235 2.10+ log2 of the least alignment that works
        ("xloadflags", U16),             # 0x236 2.12+ XLF_KERNEL_64, XLF_CAN_BE_LOADED_ABOVE_4G, ...
        ("cmdline_size", U32),           # 0x238 2.06+ longest command line, without its NUL
        ("hardware_subarch", U32),       # 0x23c 2.07+
        ("hardware_subarch_data", U64),  # 0x240 2.07+
        ("payload_offset", U32),         # 0x248 2.08+ compressed kernel, from the PM code start
        ("payload_length", U32),         # 0x24c 2.08+
        ("setup_data", U64),             # 0x250 2.09+ list of struct setup_data; 0 = none
        ("pref_address", U64),           # 0x258 2.10+ preferred load address
        ("init_size", U32),              # 0x260 2.10+ memory the kernel needs from its load address
        ("handover_offset", U32),        # 0x264 2.11+ EFI handover entry
        ("kernel_info_offset", U32),     # 0x268 2.15+ struct kernel_info, from the PM code start
    ]


HEADER_START = 0x1F1   # boot.rst: the header sits at 0x1f1 of the boot sector (and zero page)
HEADER_END = HEADER_START + ctypes.sizeof(SetupHeader)  # 0x26c: one past kernel_info_offset (2.15)
# Protocols 2.11-2.14 end one field earlier, after handover_offset (boot.rst header table: the next
# field, kernel_info_offset, is 2.15+).  What follows in such a file is setup code, not header.
HEADER_END_2_11 = HEADER_START + SetupHeader.kernel_info_offset.offset  # 0x268

BOOT_FLAG = 0xAA55       # boot.rst "boot_flag": the boot-sector signature
HDRS_MAGIC = 0x53726448  # boot.rst "header": "HdrS" read as a little-endian u32

# boot.rst "loadflags"
LOADED_HIGH = 1 << 0     # protected-mode code loaded at 0x100000 or above (always, for us)
CAN_USE_HEAP = 1 << 7    # heap_end_ptr is valid: real-mode setup only, so we clear it

# boot.rst "xloadflags"
XLF_KERNEL_64 = 1 << 0               # has the 64-bit entry at load address + 0x200
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1  # kernel, boot_params, cmdline, initrd may be above 4 GiB

# boot.rst "type_of_loader": 0xff means "undefined" (no assigned loader ID).
TYPE_OF_LOADER_UNDEFINED = 0xFF

# boot.rst "64-bit Boot Protocol": the 64-bit entry is the load address + 0x200.
ENTRY_64_OFFSET = 0x200

# boot.rst "kernel_version": the field is an offset into the setup code, less 0x200.
KERNEL_VERSION_BASE = 0x200


# ---------------------------------------------------------------------------------------------
# bootparam.h struct boot_e820_entry: one range of the firmware memory map.  Its type values are
# zeropage.E820Type.

class BootE820Entry(Struct):
    _fields_ = [
        ("addr", U64),
        ("size", U64),
        ("type", U32),
    ]


E820_MAX_ENTRIES = 128  # bootparam.h E820_MAX_ENTRIES_ZEROPAGE: e820_table's length


# ---------------------------------------------------------------------------------------------
# bootparam.h struct boot_params, offsets as in zero-page.rst.  Structures we never fill in
# (screen_info, EDD, EFI, ...) are opaque byte arrays of their size.

class BootParams(Struct):
    _fields_ = [
        ("screen_info", U8 * 0x40),            # 0x000
        ("apm_bios_info", U8 * 0x14),          # 0x040
        ("_pad2", U8 * 4),                     # 0x054
        ("tboot_addr", U64),                   # 0x058
        ("ist_info", U8 * 0x10),               # 0x060
        ("acpi_rsdp_addr", U64),               # 0x070 RSDP address: no EBDA/BIOS-area scan
        ("_pad3", U8 * 8),                     # 0x078
        ("hd0_info", U8 * 0x10),               # 0x080 obsolete
        ("hd1_info", U8 * 0x10),               # 0x090 obsolete
        ("sys_desc_table", U8 * 0x10),         # 0x0a0
        ("olpc_ofw_header", U8 * 0x10),        # 0x0b0
        ("ext_ramdisk_image", U32),            # 0x0c0 initrd address, high 32 bits
        ("ext_ramdisk_size", U32),             # 0x0c4 initrd size, high 32 bits
        ("ext_cmd_line_ptr", U32),             # 0x0c8 command line address, high 32 bits
        ("_pad4", U8 * 0x70),                  # 0x0cc
        ("cc_blob_address", U32),              # 0x13c
        ("edid_info", U8 * 0x80),              # 0x140
        ("efi_info", U8 * 0x20),               # 0x1c0
        ("alt_mem_k", U32),                    # 0x1e0
        ("scratch", U32),                      # 0x1e4
        ("e820_entries", U8),                  # 0x1e8 entries used in e820_table
        ("eddbuf_entries", U8),                # 0x1e9
        ("edd_mbr_sig_buf_entries", U8),       # 0x1ea
        ("kbd_status", U8),                    # 0x1eb
        ("secure_boot", U8),                   # 0x1ec
        ("_pad5", U8 * 2),                     # 0x1ed
        # 0x1ef: must stay 0.  A nonzero sentinel tells the kernel the loader copied the whole
        # boot sector without clearing it, and it then wipes fields it believes unset
        # (zero-page.rst; arch/x86/include/asm/bootparam_utils.h).
        ("sentinel", U8),
        ("_pad6", U8),                         # 0x1f0
        ("hdr", SetupHeader),                  # 0x1f1
        ("_pad7", U8 * (0x290 - HEADER_END)),  # 0x26c
        ("edd_mbr_sig_buffer", U32 * 16),      # 0x290
        ("e820_table", BootE820Entry * E820_MAX_ENTRIES),  # 0x2d0
        ("_pad8", U8 * 0x30),                  # 0xcd0
        ("eddbuf", U8 * 0x1EC),                # 0xd00 6 x struct edd_info (82 bytes)
        ("_pad9", U8 * 0x114),                 # 0xeec
    ]


ZERO_PAGE_SIZE = ctypes.sizeof(BootParams)  # one page
assert ZERO_PAGE_SIZE == PAGE and BootParams.hdr.offset == HEADER_START

# The setup header's room in the zero page: from 0x1f1 up to edd_mbr_sig_buffer (bootparam.h pads
# struct setup_header out to 0x290).  A header copy must stop here, whatever the kernel claims.
HDR_AREA_END = BootParams.edd_mbr_sig_buffer.offset  # 0x290
