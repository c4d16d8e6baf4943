"""A bzImage's setup header, read and checked (Linux x86 boot protocol, Documentation/arch/x86/boot.rst).

The header's layout is declared once, in structs.SetupHeader; this module decides whether a kernel
file can be booted through the 64-bit entry and says why not.
"""

from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass
from pathlib import Path

from coreslice.boot.errors import BootFormatError
from coreslice.boot.structs import (  # noqa: F401  (re-exported: callers use bzimage.<name>)
    BOOT_FLAG,
    CAN_USE_HEAP,
    ENTRY_64_OFFSET,
    HDRS_MAGIC,
    HEADER_END,
    HEADER_END_2_11,
    HEADER_START,
    KERNEL_VERSION_BASE,
    LOADED_HIGH,
    XLF_CAN_BE_LOADED_ABOVE_4G,
    XLF_KERNEL_64,
    SetupHeader,
)
from coreslice.errors import UsageError

# The slice's kernel must take its ACPI RSDP from boot_params.acpi_rsdp_addr (zero page 0x070): a
# kernel that does not searches the EBDA and 0xE0000-0xFFFFF for one (ACPI 6.5 §5.2.5.1) and finds
# the host's tables.  Linux reads that field since 5.0 (commit 384184044981, "Mostly revert commit
# ae7e1238e68f", moved it there from the setup header).  boot.rst's protocol history: 2.15 is Linux
# 5.5, so a 2.15+ header is proof enough; 2.14 was burnt by ae7e1238e68f and is "same as 2.13", so a
# 2.13 or 2.14 kernel may be either side of 5.0 and only its version string can tell; 2.13 is
# Linux 3.14, so every kernel that reports less is older than 5.0.
MIN_PROTOCOL = 0x020D        # 2.13: below it, refused without looking further
RSDP_PROTOCOL = 0x020F       # 2.15: reads acpi_rsdp_addr, whatever its version string says
RSDP_KERNEL = (5, 0)         # for 2.13/2.14: the version string must say at least this
RSDP_MINIMUM = "Linux 5.0 (boot_params.acpi_rsdp_addr)"

SECTOR = 512  # boot.rst "Loading The Rest of The Kernel": setup is (setup_sects + 1) sectors
FIRST_READ = 0x400  # enough for the boot sector and the whole header

_FIELDS = {name: getattr(SetupHeader, name) for name, _ in SetupHeader._fields_}


def _field(name: str) -> tuple[int, int]:
    """(offset in the file or zero page, size) of a setup header field; KeyError if unknown."""
    f = _FIELDS[name]
    return HEADER_START + f.offset, f.size


def get_field(buf: bytes | bytearray, name: str) -> int:
    """One header field of a kernel file or zero page, by its boot.rst name."""
    off, size = _field(name)
    return int.from_bytes(buf[off:off + size], "little")


def set_field(buf: bytearray, name: str, value: int) -> None:
    off, size = _field(name)
    buf[off:off + size] = value.to_bytes(size, "little")


def _protocol_str(version: int) -> str:
    return f"{version >> 8}.{version & 0xFF:02d}"


def _release(version_string: str) -> tuple[int, int] | None:
    """(major, minor) from a kernel version string such as "5.4.0-150-generic (buildd@...) #167"."""
    m = re.match(r"(\d+)\.(\d+)", version_string)
    return (int(m[1]), int(m[2])) if m else None


def _reads_rsdp_from_boot_params(protocol: int, version_string: str) -> bool:
    if protocol >= RSDP_PROTOCOL:
        return True
    release = _release(version_string)
    return protocol >= MIN_PROTOCOL and release is not None and release >= RSDP_KERNEL


def _header_end(jump: int) -> int:
    """boot.rst "jump": 0xEB, then a signed offset from 0x202 that ends the header; -1 if no 0xEB."""
    if jump & 0xFF != 0xEB:
        return -1
    offset = jump >> 8
    return 0x202 + (offset - 0x100 if offset & 0x80 else offset)


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
        return _protocol_str(self.protocol)

    @property
    def can_load_above_4g(self) -> bool:
        return bool(self.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G)

    def header_bytes(self) -> bytes:
        """The setup header as it must be copied into the zero page (from 0x1f1).

        All of it and no more, up to header_end: a newer kernel's header may be longer than
        SetupHeader, a 2.13 one is shorter (what follows it is setup code).
        """
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


def parse_bzimage(path: str | os.PathLike) -> BzImage:
    """Read and check the setup header of a kernel file.

    Only the real-mode setup part is read into memory; the protected-mode kernel is streamed by
    the writer later.  Raises BootFormatError for a file that is not a usable bzImage (its
    message does not name the file: the caller does), UsageError for one that cannot be read.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            first = f.read(FIRST_READ)
            if len(first) < HEADER_END:
                raise BootFormatError(f"file is {size} bytes, too short for a setup header")
            hdr = SetupHeader.parse(first, HEADER_START)
            setup_len = ((hdr.setup_sects or 4) + 1) * SECTOR  # boot.rst "setup_sects": 0 means 4
            f.seek(0)
            setup = f.read(setup_len)
    except FileNotFoundError:
        raise UsageError(f"kernel {path}: no such file; pass --kernel with the path of a bzImage") from None
    except IsADirectoryError:
        raise UsageError(f"kernel {path}: is a directory; pass --kernel with the path of a bzImage") from None
    except PermissionError:
        raise UsageError(f"kernel {path}: permission denied; run as root or make it readable") from None

    if hdr.boot_flag != BOOT_FLAG or hdr.header != HDRS_MAGIC:
        raise BootFormatError("not a bzImage (no 'HdrS' boot header)")
    if len(setup) < setup_len or size <= setup_len:
        raise BootFormatError(f"truncated: {size} bytes, setup alone needs {setup_len}")

    # boot.rst "kernel_version" (2.00+, so in every header): the string's offset in the setup
    # code, less 0x200.
    version_string = ""
    kv = hdr.kernel_version + KERNEL_VERSION_BASE
    if hdr.kernel_version and kv < len(setup):
        version_string = setup[kv:kv + 256].split(b"\0", 1)[0].decode("ascii", "replace")
    if not _reads_rsdp_from_boot_params(hdr.version, version_string):
        found = version_string.split()[0] if version_string.strip() else "unknown (no version string)"
        raise BootFormatError(
            f"is too old: kernel version {found}, boot protocol {_protocol_str(hdr.version)}; the "
            f"minimum is {RSDP_MINIMUM}, as older kernels scan low memory for an ACPI RSDP and "
            "would find the host's", "use Linux 5.0 or newer")

    # The header ends where boot.rst "jump" says; fields past that end are not the kernel's (a 2.13
    # header stops before kernel_info_offset), so they are read as 0, never from the setup code.
    header_end = _header_end(hdr.jump)
    if header_end < 0:
        raise BootFormatError(f"has no short jump (0xEB) at 0x200 to size its setup header, found 0x{hdr.jump:04x}")
    need = HEADER_END if hdr.version >= RSDP_PROTOCOL else HEADER_END_2_11
    if not need <= header_end <= setup_len:
        raise BootFormatError(
            f"setup header length {header_end - HEADER_START:#x} is implausible: a protocol "
            f"{_protocol_str(hdr.version)} header is at least 0x{need - HEADER_START:x} bytes "
            f"and ends inside the {setup_len}-byte setup")
    own = setup[HEADER_START:header_end]
    hdr = SetupHeader.from_buffer_copy(own[:ctypes.sizeof(SetupHeader)].ljust(ctypes.sizeof(SetupHeader), b"\0"))

    kernel_size = size - setup_len
    # syssize counts 16-byte paragraphs of the protected-mode part; a shorter file was cut.
    if hdr.syssize * 16 > kernel_size:
        raise BootFormatError(f"truncated: header says {hdr.syssize * 16} bytes of kernel, file has {kernel_size}")
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise BootFormatError("has no 64-bit entry point (XLF_KERNEL_64 clear)", "use an x86-64 kernel")
    if not hdr.relocatable_kernel:
        raise BootFormatError("is not relocatable", "use a kernel built with CONFIG_RELOCATABLE=y")

    return BzImage(
        path=path,
        file_size=size,
        setup=bytes(setup),
        header_end=header_end,
        protocol=hdr.version,
        loadflags=hdr.loadflags,
        xloadflags=hdr.xloadflags,
        kernel_alignment=hdr.kernel_alignment,
        initrd_addr_max=hdr.initrd_addr_max,
        cmdline_size=hdr.cmdline_size,
        init_size=hdr.init_size,
        pref_address=hdr.pref_address,
        kernel_offset=setup_len,
        kernel_size=kernel_size,
        version_string=version_string,
    )
