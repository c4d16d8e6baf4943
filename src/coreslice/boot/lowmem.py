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

import json
import struct
from dataclasses import dataclass

from coreslice.boot.trampoline import RECORD_OFFSET, RECORD_SIZE

SLOT_SIZE = 0x10000
SLOT_BASES = tuple(range(0x20000, 0x90000, SLOT_SIZE))
PAGE_TABLES_OFFSET = 0x1000
PAGE_TABLES_MAX = 0x7000
LOW_RAM_OFFSET = 0x8000

RECORD_MAGIC = b"CSLICE01"
_HDR = struct.Struct("<8sH")


@dataclass(frozen=True)
class SlotRecord:
    boot_id: str
    apic_ids: tuple[int, ...]
    mem_base: int
    mem_size: int

    def encode(self) -> bytes:
        body = json.dumps({"boot_id": self.boot_id, "apic_ids": list(self.apic_ids),
                           "mem": [self.mem_base, self.mem_size]}, separators=(",", ":")).encode()
        raw = _HDR.pack(RECORD_MAGIC, len(body)) + body
        if len(raw) > RECORD_SIZE:
            raise ValueError(f"slot record of {len(raw)} bytes exceeds {RECORD_SIZE}")
        return raw.ljust(RECORD_SIZE, b"\0")

    @classmethod
    def decode(cls, raw: bytes) -> "SlotRecord | None":
        if len(raw) < _HDR.size:
            return None
        magic, length = _HDR.unpack_from(raw)
        if magic != RECORD_MAGIC or _HDR.size + length > len(raw):
            return None
        try:
            d = json.loads(raw[_HDR.size:_HDR.size + length])
            return cls(str(d["boot_id"]), tuple(int(x) for x in d["apic_ids"]), int(d["mem"][0]), int(d["mem"][1]))
        except (ValueError, KeyError, TypeError, IndexError):
            return None


def record_address(slot: int) -> int:
    return slot + RECORD_OFFSET
