"""Slots below 1 MiB, one per running slice.

A woken CPU starts in real mode, so its first instructions must sit below 1 MiB (the SIPI vector
names a 4 KiB page there).  A slice kernel also needs a little RAM below 1 MiB of its own: Linux
allocates its real-mode trampoline there to start its other CPUs (arch/x86/realmode/init.c, and
the decompressor's 32-bit paging trampoline looks there too).  So each slice gets one slot:

    slot + 0x0000  trampoline page (SIPI target) + ownership record   e820: reserved
    slot + 0x1000  page tables used by the trampoline (<= 7 pages)     e820: reserved
    slot + 0x8000  low RAM handed to the slice kernel (32 KiB)         e820: RAM

The host kernel reserves all of its low 1 MiB at boot and allocates its own real-mode trampoline
top-down below the EBDA, so slots start at 128 KiB (above the BIOS-corruption-check window at
64-128 KiB) and stop at 576 KiB, well below where the host trampoline lands.

The ownership record in the trampoline page (boot id, APIC IDs, memory) tells later launches which
slots belong to slices started since this host boot, without any state on disk.
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass

from coreslice.boot.structs import U16, Struct
from coreslice.boot.trampoline import RECORD_OFFSET, RECORD_SIZE

SLOT_SIZE = 0x10000
SLOT_BASES = tuple(range(0x20000, 0x90000, SLOT_SIZE))
PAGE_TABLES_OFFSET = 0x1000
PAGE_TABLES_MAX = 0x7000
LOW_RAM_OFFSET = 0x8000

RECORD_MAGIC = b"CSLICE01"


class SlotRecordLayout(Struct):
    """The ownership record at slot + RECORD_OFFSET: coreslice's own format, read back by later
    launches of this host boot (so its bytes must not change without a new magic)."""

    _fields_ = [
        ("magic", ctypes.c_char * 8),             # RECORD_MAGIC; anything else: no record
        ("body_length", U16),                     # bytes of body in use
        ("body", ctypes.c_char * (RECORD_SIZE - 8 - 2)),  # compact JSON, NUL padded
    ]


assert ctypes.sizeof(SlotRecordLayout) == RECORD_SIZE
_BODY = SlotRecordLayout.body.offset


@dataclass(frozen=True)
class SlotRecord:
    boot_id: str
    apic_ids: tuple[int, ...]
    mem_base: int
    mem_size: int

    def encode(self) -> bytes:
        body = json.dumps({"boot_id": self.boot_id, "apic_ids": list(self.apic_ids),
                           "mem": [self.mem_base, self.mem_size]}, separators=(",", ":")).encode()
        if _BODY + len(body) > RECORD_SIZE:
            raise ValueError(f"slot record of {_BODY + len(body)} bytes exceeds {RECORD_SIZE}")
        return bytes(SlotRecordLayout(magic=RECORD_MAGIC, body_length=len(body), body=body))

    @classmethod
    def decode(cls, raw: bytes) -> SlotRecord | None:
        """The record in ``raw`` (read from slot + RECORD_OFFSET), or None if it holds none."""
        if len(raw) < _BODY:
            return None
        rec = SlotRecordLayout.from_buffer_copy(bytes(raw[:RECORD_SIZE]).ljust(RECORD_SIZE, b"\0"))
        if rec.magic != RECORD_MAGIC or _BODY + rec.body_length > min(len(raw), RECORD_SIZE):
            return None
        try:
            d = json.loads(bytes(rec)[_BODY:_BODY + rec.body_length])
            return cls(str(d["boot_id"]), tuple(int(x) for x in d["apic_ids"]), int(d["mem"][0]), int(d["mem"][1]))
        except (ValueError, KeyError, TypeError, IndexError):
            return None


def record_address(slot: int) -> int:
    return slot + RECORD_OFFSET
