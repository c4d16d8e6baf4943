"""Scrubbing: zero what a slice held, so the next slice (or the host) never sees its data.

What a slice holds in physical memory is its RAM range and its low-memory slot (trampoline,
ownership record, page tables, and the 32 KiB of low RAM its kernel used: boot/lowmem.py).  Both
are zeroed after its CPUs are INITed and its devices have stopped DMA: on `coreslice stop`, and
before every launch into them (an earlier slice may have ended without a stop, e.g. by a crash
of the host's coreslice).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from coreslice.boot import lowmem
from coreslice.machine.physmem import PhysicalMemory
from coreslice.units import format_size

Progress = Callable[[str], None]


def ranges(mem_base: int, mem_size: int, low_slot: int | None) -> list[tuple[int, int]]:
    """(start, size) of everything a slice held: its RAM, then its low-memory slot."""
    out = [(mem_base, mem_size)]
    if low_slot is not None:
        out.append((low_slot, lowmem.SLOT_SIZE))
    return out


def scrub(mem: PhysicalMemory, spans: list[tuple[int, int]], progress: Progress) -> float:
    """Zero every span; returns the seconds it took."""
    t0 = time.perf_counter()
    for start, size in spans:
        progress(f"scrubbing {format_size(size)} at 0x{start:x}")
        last = [t0]

        def tell(done: int, total: int, start=start, last=last) -> None:
            now = time.perf_counter()
            if done < total and now - last[0] >= 2.0:  # a line every 2 s on large ranges
                last[0] = now
                progress(f"  {done * 100 // total}% of 0x{start:x}")

        mem.zero(start, size, tell)
    return time.perf_counter() - t0
