"""A bzImage's setup header, read and checked (Linux x86 boot protocol, Documentation/arch/x86/boot.rst).

The header's layout is declared once, in structs.SetupHeader; this module decides whether a kernel
file can be booted through the 64-bit entry and says why not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from coreslice.boot.errors import BootFormatError
from coreslice.boot.structs import (  # noqa: F401  (re-exported: callers use bzimage.<name>)
    BOOT_FLAG,
    CAN_USE_HEAP,
    ENTRY_64_OFFSET,
    HDRS_MAGIC,
    HEADER_END,
    HEADER_START,
    KERNEL_VERSION_BASE,
    LOADED_HIGH,
    XLF_CAN_BE_LOADED_ABOVE_4G,
    XLF_KERNEL_64,
    SetupHeader,
)
from coreslice.errors import UsageError

# Boot protocol 2.12 added xloadflags (XLF_KERNEL_64 tells us the 64-bit entry exists) and the
# ext_* fields that let the initrd and command line live above 4 GiB.
MIN_PROTOCOL = 0x020C

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

        All of it, up to header_end: a newer kernel's header may be longer than SetupHeader.
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
    if hdr.version < MIN_PROTOCOL:
        raise BootFormatError(f"boot protocol {_protocol_str(hdr.version)} is too old "
                              "(2.12 or newer needed for the 64-bit entry)", "use a kernel newer than 3.8")
    if len(setup) < setup_len or size <= setup_len:
        raise BootFormatError(f"truncated: {size} bytes, setup alone needs {setup_len}")
    kernel_size = size - setup_len
    # syssize counts 16-byte paragraphs of the protected-mode part; a shorter file was cut.
    if hdr.syssize * 16 > kernel_size:
        raise BootFormatError(f"truncated: header says {hdr.syssize * 16} bytes of kernel, file has {kernel_size}")
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise BootFormatError("has no 64-bit entry point (XLF_KERNEL_64 clear)", "use an x86-64 kernel")
    if not hdr.relocatable_kernel:
        raise BootFormatError("is not relocatable", "use a kernel built with CONFIG_RELOCATABLE=y")
    # boot.rst "jump": the header ends at 0x202 plus the byte at 0x201 (the short jump's offset).
    header_end = 0x202 + (hdr.jump >> 8)
    if header_end > setup_len or header_end < HEADER_END:
        raise BootFormatError(f"setup header length 0x{header_end - HEADER_START:x} is implausible")

    version_string = ""
    kv = hdr.kernel_version + KERNEL_VERSION_BASE
    if hdr.kernel_version and kv < len(setup):
        version_string = setup[kv:kv + 256].split(b"\0", 1)[0].decode("ascii", "replace")

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
