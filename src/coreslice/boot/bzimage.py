"""The bzImage setup header (Linux x86 boot protocol, Documentation/arch/x86/boot.rst).

The header is declared once, as a table of (name, offset, struct format) rows, and used both to
parse a kernel file and to write the copy that goes into the zero page.  Offsets are those of the
boot sector / zero page: the header starts at 0x1f1.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from coreslice.errors import UsageError

HEADER_START = 0x1F1
HDRS_MAGIC = 0x53726448  # "HdrS" at 0x202
BOOT_FLAG = 0xAA55       # at 0x1fe, as in a boot sector

# Boot protocol 2.12 added xloadflags (XLF_KERNEL_64 tells us the 64-bit entry exists) and the
# ext_* fields that let the initrd and command line live above 4 GiB.
MIN_PROTOCOL = 0x020C

# loadflags (boot.rst "loadflags")
LOADED_HIGH = 1 << 0
CAN_USE_HEAP = 1 << 7
# xloadflags (boot.rst "xloadflags")
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1

# The 64-bit entry point is at a fixed offset from the load address (boot.rst "64-bit Boot Protocol").
ENTRY_64_OFFSET = 0x200

# (name, offset, format) — boot.rst "The Real-Mode Kernel Header".
SETUP_HEADER = (
    ("setup_sects", 0x1F1, "B"),
    ("root_flags", 0x1F2, "H"),
    ("syssize", 0x1F4, "I"),
    ("ram_size", 0x1F8, "H"),
    ("vid_mode", 0x1FA, "H"),
    ("root_dev", 0x1FC, "H"),
    ("boot_flag", 0x1FE, "H"),
    ("jump", 0x200, "H"),
    ("header", 0x202, "I"),
    ("version", 0x206, "H"),
    ("realmode_swtch", 0x208, "I"),
    ("start_sys_seg", 0x20C, "H"),
    ("kernel_version", 0x20E, "H"),
    ("type_of_loader", 0x210, "B"),
    ("loadflags", 0x211, "B"),
    ("setup_move_size", 0x212, "H"),
    ("code32_start", 0x214, "I"),
    ("ramdisk_image", 0x218, "I"),
    ("ramdisk_size", 0x21C, "I"),
    ("bootsect_kludge", 0x220, "I"),
    ("heap_end_ptr", 0x224, "H"),
    ("ext_loader_ver", 0x226, "B"),
    ("ext_loader_type", 0x227, "B"),
    ("cmd_line_ptr", 0x228, "I"),
    ("initrd_addr_max", 0x22C, "I"),
    ("kernel_alignment", 0x230, "I"),
    ("relocatable_kernel", 0x234, "B"),
    ("min_alignment", 0x235, "B"),
    ("xloadflags", 0x236, "H"),
    ("cmdline_size", 0x238, "I"),
    ("hardware_subarch", 0x23C, "I"),
    ("hardware_subarch_data", 0x240, "Q"),
    ("payload_offset", 0x248, "I"),
    ("payload_length", 0x24C, "I"),
    ("setup_data", 0x250, "Q"),
    ("pref_address", 0x258, "Q"),
    ("init_size", 0x260, "I"),
    ("handover_offset", 0x264, "I"),
    ("kernel_info_offset", 0x268, "I"),
)
_FIELDS = {name: (off, fmt) for name, off, fmt in SETUP_HEADER}


def get_field(buf: bytes | bytearray, name: str) -> int:
    off, fmt = _FIELDS[name]
    return struct.unpack_from("<" + fmt, buf, off)[0]


def set_field(buf: bytearray, name: str, value: int) -> None:
    off, fmt = _FIELDS[name]
    struct.pack_into("<" + fmt, buf, off, value)


@dataclass(frozen=True)
class BzImage:
    """What the loader needs to know about a kernel file."""

    path: Path
    file_size: int
    setup: bytes          # the real-mode part (boot sector + setup), whose header we copy
    header_end: int       # offset one past the last header byte (0x202 + byte at 0x201)
    protocol: int
    loadflags: int
    xloadflags: int
    kernel_alignment: int
    initrd_addr_max: int
    cmdline_size: int
    init_size: int
    pref_address: int
    kernel_offset: int    # where the protected-mode kernel starts in the file
    kernel_size: int
    version_string: str

    @property
    def protocol_str(self) -> str:
        return f"{self.protocol >> 8}.{self.protocol & 0xFF:02d}"

    @property
    def can_load_above_4g(self) -> bool:
        return bool(self.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G)

    def header_bytes(self) -> bytes:
        """The setup header as it must be copied into the zero page (from 0x1f1)."""
        return self.setup[HEADER_START:self.header_end]

    def to_json(self) -> dict:
        return {
            "path": str(self.path),
            "version": self.version_string,
            "protocol": self.protocol_str,
            "kernel_alignment": self.kernel_alignment,
            "init_size": self.init_size,
            "initrd_addr_max": self.initrd_addr_max,
            "cmdline_size": self.cmdline_size,
            "can_load_above_4g": self.can_load_above_4g,
            "kernel_size": self.kernel_size,
        }


def _fail(path: Path, problem: str, fix: str = "pass a bzImage of an x86-64 Linux kernel (e.g. /boot/vmlinuz-*)") -> UsageError:
    return UsageError(f"kernel {path}: {problem}; {fix}")


def parse_bzimage(path: str | os.PathLike) -> BzImage:
    """Read and check the setup header of a kernel file.

    Only the real-mode setup part is read into memory; the protected-mode kernel is streamed by
    the writer later.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            first = f.read(0x400)
            if len(first) < 0x270:
                raise _fail(path, f"file is {size} bytes, too short for a setup header")
            setup_sects = first[0x1F1] or 4  # boot.rst: 0 means 4 for very old kernels
            setup_len = (setup_sects + 1) * 512
            f.seek(0)
            setup = f.read(setup_len)
    except FileNotFoundError:
        raise UsageError(f"kernel {path}: no such file; pass --kernel with the path of a bzImage") from None
    except IsADirectoryError:
        raise UsageError(f"kernel {path}: is a directory; pass --kernel with the path of a bzImage") from None
    except PermissionError:
        raise UsageError(f"kernel {path}: permission denied; run as root or make it readable") from None

    if get_field(setup, "boot_flag") != BOOT_FLAG or get_field(setup, "header") != HDRS_MAGIC:
        raise _fail(path, "not a bzImage (no 'HdrS' boot header)")
    protocol = get_field(setup, "version")
    if protocol < MIN_PROTOCOL:
        raise _fail(path, f"boot protocol {protocol >> 8}.{protocol & 0xff:02d} is too old "
                          "(2.12 or newer needed for the 64-bit entry)",
                    "use a kernel newer than 3.8")
    if len(setup) < setup_len or size <= setup_len:
        raise _fail(path, f"truncated: {size} bytes, setup alone needs {setup_len}")
    syssize = get_field(setup, "syssize")
    kernel_size = size - setup_len
    # syssize counts 16-byte paragraphs of the protected-mode part; a shorter file was cut.
    if syssize * 16 > kernel_size:
        raise _fail(path, f"truncated: header says {syssize * 16} bytes of kernel, file has {kernel_size}")
    xloadflags = get_field(setup, "xloadflags")
    if not xloadflags & XLF_KERNEL_64:
        raise _fail(path, "has no 64-bit entry point (XLF_KERNEL_64 clear)", "use an x86-64 kernel")
    if not get_field(setup, "relocatable_kernel"):
        raise _fail(path, "is not relocatable", "use a kernel built with CONFIG_RELOCATABLE=y")
    header_end = 0x202 + setup[0x201]
    if header_end > setup_len or header_end < 0x26C:
        raise _fail(path, f"setup header length 0x{header_end - HEADER_START:x} is implausible")

    version_string = ""
    kv = get_field(setup, "kernel_version")
    if kv and kv + 0x200 < len(setup):
        raw = setup[kv + 0x200: kv + 0x200 + 256]
        version_string = raw.split(b"\0", 1)[0].decode("ascii", "replace")

    return BzImage(
        path=path,
        file_size=size,
        setup=bytes(setup),
        header_end=header_end,
        protocol=protocol,
        loadflags=get_field(setup, "loadflags"),
        xloadflags=xloadflags,
        kernel_alignment=get_field(setup, "kernel_alignment"),
        initrd_addr_max=get_field(setup, "initrd_addr_max"),
        cmdline_size=get_field(setup, "cmdline_size"),
        init_size=get_field(setup, "init_size"),
        pref_address=get_field(setup, "pref_address"),
        kernel_offset=setup_len,
        kernel_size=kernel_size,
        version_string=version_string,
    )
