"""Find and parse the VMCOREINFO ELF note in a slice kernel's RAM.

Written by hand: no maintained Python library reads a live kernel's log from raw physical
memory.  drgn (PyPI drgn, Debian bookworm python3-drgn 0.0.22) reads kernel memory, but its
printk helpers need the kernel's DWARF types (Debian's linux-image-*-dbg, ~1 GiB per kernel
build) and it is built around /proc/kcore or a vmcore; VMCOREINFO alone, which every stock
kernel keeps in its own RAM for kdump, is all this reader needs.

The note (kernel/vmcore_info.c, crash_save_vmcoreinfo_init and append_elf_note) is an Elf64_Nhdr
{n_namesz = 11, n_descsz, n_type = 0}, the name "VMCOREINFO\\0" padded to 12 bytes, then
n_descsz bytes of "KEY=VALUE\\n" lines (OSRELEASE=..., SYMBOL(prb)=<hex>, OFFSET(a.b)=<dec>,
SIZE(a)=<dec>, NUMBER(a)=<signed dec>, KERNELOFFSET=<hex>: the VMCOREINFO_* macros of
include/linux/vmcore_info.h).  It lives in a page the kernel allocates at boot, anywhere in its
RAM, so it is found by scanning.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from coreslice.errors import CoresliceError

Read = Callable[[int, int], bytes]

NAME = b"VMCOREINFO\x00\x00"          # VMCOREINFO_NOTE_NAME, padded to 4 bytes
HEADER = struct.Struct("<III")          # Elf64_Nhdr: n_namesz, n_descsz, n_type
MARK = b"\x00\x00\x00\x00" + NAME       # n_type = 0 followed by the name: what the scan looks for
MAX_DESC = 4096                          # VMCOREINFO_BYTES: the text never exceeds one page
CHUNK = 16 << 20                         # scan this much per read
NOTE_ALIGN = 4                           # ELF notes are 4-byte aligned (the kernel's is page aligned)


class LogUnreadable(CoresliceError):
    """The slice's memory holds no readable kernel log (yet): no note, or values that make no sense."""


@dataclass(frozen=True)
class VmcoreInfo:
    """The parsed note: ``fields`` holds every KEY=VALUE line as text."""

    addr: int
    fields: dict[str, str]

    def _get(self, key: str) -> str:
        try:
            return self.fields[key]
        except KeyError:
            raise LogUnreadable(f"VMCOREINFO has no {key}; the slice kernel is not one this reader knows "
                                "(Linux >= 5.10 on x86-64 with CONFIG_VMCORE_INFO)") from None

    def _int(self, key: str, base: int) -> int:
        text = self._get(key)
        try:
            return int(text, base)
        except ValueError:
            raise LogUnreadable(f"VMCOREINFO {key}={text!r} is not a number; the note is damaged") from None

    def symbol(self, name: str) -> int:
        return self._int(f"SYMBOL({name})", 16)           # "%lx"

    def offset(self, struct_name: str, field: str) -> int:
        return self._int(f"OFFSET({struct_name}.{field})", 10)

    def size(self, name: str) -> int:
        return self._int(f"SIZE({name})", 10)

    def number(self, name: str, default: int | None = None) -> int:
        if default is not None and f"NUMBER({name})" not in self.fields:
            return default
        return self._int(f"NUMBER({name})", 10)           # "%ld"

    @property
    def kernel_offset(self) -> int:
        return self._int("KERNELOFFSET", 16) if "KERNELOFFSET" in self.fields else 0

    @property
    def osrelease(self) -> str | None:
        return self.fields.get("OSRELEASE")


def parse(text: bytes) -> dict[str, str]:
    """KEY=VALUE lines (up to the first NUL) into a dict; lines without '=' are ignored."""
    out: dict[str, str] = {}
    for line in text.split(b"\x00", 1)[0].decode("ascii", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            out[key] = value
    return out


def note_at(read: Read, addr: int) -> VmcoreInfo | None:
    """The note whose header starts at ``addr``, or None when there is none."""
    head = read(addr, HEADER.size + len(NAME))
    namesz, descsz, ntype = HEADER.unpack_from(head)
    if namesz != len("VMCOREINFO") + 1 or ntype != 0 or head[HEADER.size:] != NAME or not 0 < descsz <= MAX_DESC:
        return None
    fields = parse(read(addr + len(head), descsz))
    return VmcoreInfo(addr, fields) if "OSRELEASE" in fields else None


def scan(read: Read, base: int, size: int, chunk: int = CHUNK) -> list[VmcoreInfo]:
    """Every note in [base, base + size), read ``chunk`` bytes at a time (chunks overlap by the
    marker's length so that a note across a boundary is found once)."""
    found: list[VmcoreInfo] = []
    seen: set[int] = set()
    overlap = HEADER.size + len(NAME)
    pos = base
    end = base + size
    while pos < end:
        n = min(chunk + overlap, end - pos)
        data = read(pos, n)
        i = data.find(MARK)
        while i >= 0:
            addr = pos + i - 8  # the mark starts at n_type, 8 bytes into the header
            if addr >= base and addr % NOTE_ALIGN == 0 and addr not in seen and addr + overlap <= end:
                seen.add(addr)
                note = note_at(read, addr)
                if note is not None:
                    found.append(note)
            i = data.find(MARK, i + 1)
        pos += chunk
    return found


def find(read: Read, base: int, size: int, hint: int | None = None) -> VmcoreInfo:
    """The slice kernel's note: at ``hint`` when it is still there, else the only one in its RAM.

    Several notes mean a previous kernel's is left in RAM that was not scrubbed: which one is
    live cannot be told from memory alone, so that is refused rather than guessed."""
    if hint is not None and base <= hint < base + size:
        note = note_at(read, hint)
        if note is not None:
            return note
    notes = scan(read, base, size)
    if not notes:
        raise LogUnreadable("no VMCOREINFO note in the slice's RAM yet (its kernel has not got that far, "
                            "or is not Linux with CONFIG_VMCORE_INFO); try again once it has booted")
    if len(notes) > 1:
        where = ", ".join(f"0x{n.addr:x}" for n in notes)
        raise LogUnreadable(f"{len(notes)} VMCOREINFO notes in the slice's RAM (at {where}): an earlier kernel's "
                            "is left over; stop the slice and boot it again so that its RAM is scrubbed")
    return notes[0]
