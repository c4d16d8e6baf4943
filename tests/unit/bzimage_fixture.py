"""A synthetic bzImage for unit tests: a boot-protocol 2.15 setup header (or an older one) and a
made-up payload.

It passes parse_bzimage and lets the loader plan, build and write an image (to the fake machine);
it is not a kernel and nothing runs it.  The header is filled in through structs.SetupHeader,
whose offsets test_bzimage.py checks against boot.rst, so a wrong declaration fails there rather
than passing here silently.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from coreslice.boot import structs
from coreslice.boot.layout import MIB

RELEASE = "6.12.0-coreslice-synthetic"
VERSION_STRING = f"{RELEASE} (unit tests) #1 SMP"

SETUP_SECTS = 7                 # setup = boot sector + 7 sectors = 4 KiB
VERSION_AT = 0x300              # the version string, after the header, inside the setup sectors
PAYLOAD_SIZE = 512 * 1024       # the ``bzimage`` fixture: enough to plan, build and write
INIT_SIZE = 16 * MIB            # any size above the payload's works

# The ``debian_kernel`` stand-in has the sizes of the Debian 6.12 bzImage it replaces (12 MiB of
# kernel, init_size 56 MiB), so tests written against that kernel plan and write what they did:
# test_boot_validation.py cuts the file at 1 MiB and expects "truncated", and test_ledger.py's
# races of two `coreslice boot` processes were tuned with launches that write that much.
DEBIAN_SIZED = {"payload_size": 12 * MIB, "init_size": 56 * MIB}


@dataclass(frozen=True)
class SyntheticKernel:
    """What the ``debian_kernel`` fixture gave the unit tests, without the download."""

    vmlinuz: Path
    release: str = RELEASE


def build_bzimage(*, protocol: int = 0x020F, payload_size: int = PAYLOAD_SIZE, init_size: int = INIT_SIZE,
                  header_extra: int = 0, seed: int = 1, version_string: str = VERSION_STRING) -> bytes:
    """The file's bytes.  ``header_extra`` lengthens the header past kernel_info_offset (as a
    newer protocol would) with bytes 0xA5.  A protocol below 2.15 gets the shorter header of its
    time, ending after handover_offset, followed by (made-up) setup code 0x5A where a 2.15 header
    would hold kernel_info_offset.  The payload is pseudo-random so that reading it from the wrong
    file offset cannot go unnoticed."""
    setup = bytearray((SETUP_SECTS + 1) * 512)
    hdr = structs.SetupHeader.from_buffer(setup, structs.HEADER_START)
    hdr.setup_sects = SETUP_SECTS
    hdr.syssize = -(-payload_size // 16)
    hdr.boot_flag = structs.BOOT_FLAG
    # boot.rst "jump": a short jump (0xEB) whose offset byte says where the header ends.
    header_end = (structs.HEADER_END if protocol >= 0x020F else structs.HEADER_END_2_11) + header_extra
    hdr.jump = 0xEB | (header_end - 0x202) << 8
    hdr.header = structs.HDRS_MAGIC
    hdr.version = protocol
    hdr.kernel_version = VERSION_AT - structs.KERNEL_VERSION_BASE
    hdr.loadflags = structs.LOADED_HIGH
    hdr.code32_start = 0x100000
    hdr.initrd_addr_max = 0x7FFFFFFF
    hdr.kernel_alignment = 2 * MIB
    hdr.relocatable_kernel = 1
    hdr.min_alignment = 21      # log2(2 MiB)
    hdr.xloadflags = structs.XLF_KERNEL_64 | structs.XLF_CAN_BE_LOADED_ABOVE_4G
    hdr.cmdline_size = 2047
    hdr.pref_address = 16 * MIB
    hdr.init_size = init_size
    del hdr  # release the view of setup
    setup[header_end:structs.HEADER_END] = b"\x5A" * (structs.HEADER_END - header_end)
    setup[header_end - header_extra:header_end] = b"\xA5" * header_extra
    setup[VERSION_AT:VERSION_AT + len(version_string)] = version_string.encode()
    return bytes(setup) + random.Random(seed).randbytes(payload_size)


def write_bzimage(path: Path, **kw) -> Path:
    path.write_bytes(build_bzimage(**kw))
    return path
