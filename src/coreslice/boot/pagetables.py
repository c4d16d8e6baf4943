"""Identity-mapping page tables for the trampoline's switch to long mode.

Intel SDM Vol. 3A §4.5 (4-level paging): CR3 -> PML4 -> PDPT -> PD -> PT.  The Linux 64-bit boot
protocol (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol") only asks that the kernel, the
zero page and the command line be identity mapped; the kernel builds its own tables right after
entry.  These tables map exactly the requested ranges (to 4 KiB granularity) and nothing else:

  - a 2 MiB page (a PD entry with PS=1, §4.5.4) only where a whole aligned 2 MiB block is
    requested and lies at or above 2 MiB;
  - 4 KiB pages (a PT) for the unaligned edges of a range, and for everything in the first 2 MiB.
    A large page over memory of more than one MTRR type is undefined (SDM Vol. 3A §11.11.9, "Large
    Page Size Considerations"), and the first MiB is split by the fixed-range MTRRs (§11.11.2.2:
    64 KiB, 16 KiB and 4 KiB ranges, the legacy VGA hole at 0xA0000 among them), which is where
    the trampoline's own page lies.  An edge 2 MiB page would also map memory past the range, e.g.
    past the top of the slice's memory.

Layout at physical ``base`` (all tables 4 KiB, packed with no gaps, each kind in address order)::

    base + 0x0000   PML4                 (CR3 = base)
    base + 0x1000   PDPTs, then PDs, then PTs

Pure functions: they return bytes and write nothing.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from coreslice.boot.layout import MIB, PAGE
from coreslice.errors import UsageError

LARGE_PAGE = 2 * MIB  # mapped by one PDE with PS=1 (SDM §4.5.4)
ENTRIES = 512  # 8-byte entries per 4 KiB table
PAGES_PER_LARGE = LARGE_PAGE // PAGE

# Identity mapping means virtual == physical, and a 4-level virtual address must be canonical
# (bits 63:47 all equal, SDM Vol. 1 §3.3.7.1), so the lower half, [0, 2^47), is the most we can
# map.
# Real MAXPHYADDR is often smaller (46 bits on many Intel servers); the caller knows the host.
ADDRESS_LIMIT = 1 << 47

# Entry flag bits (SDM Vol. 3A §4.5.4, Tables 4-15 to 4-20: PML4E, PDPTE, PDE, PTE formats).
P = 1 << 0  # present
RW = 1 << 1  # writable (CR0.WP aside, supervisor writes are allowed either way)
PS = 1 << 7  # in a PDE: this entry maps a 2 MiB page (in a PTE, bit 7 is PAT: left 0)

# PWT = PCD = PAT = 0 everywhere: PAT entry 0 (§11.12.3), write-back as the processor sets it at
# power-up (§11.12.4), so the memory type is the MTRRs' for that address.
TABLE_FLAGS = P | RW
LARGE_PAGE_FLAGS = P | RW | PS
PAGE_FLAGS = P | RW


@dataclass(frozen=True)
class _Plan:
    """What to map: whole 2 MiB blocks, and per 2 MiB block the 4 KiB pages of a partial one."""

    large: tuple[int, ...]                        # 2 MiB block numbers, sorted
    small: dict[int, tuple[int, ...]]             # 2 MiB block number -> 4 KiB page numbers

    def pdpts(self) -> list[int]:
        """PML4 indices that need a PDPT."""
        return sorted({_indices(b)[0] for b in (*self.large, *self.small)})

    def pds(self) -> list[tuple[int, int]]:
        """(PML4, PDPT) indices that need a PD."""
        return sorted({_indices(b)[:2] for b in (*self.large, *self.small)})

    def pts(self) -> list[int]:
        """2 MiB block numbers that need a PT."""
        return sorted(self.small)

    def table_count(self) -> int:
        return 1 + len(self.pdpts()) + len(self.pds()) + len(self.pts())


def _check(ranges: Sequence[tuple[int, int]]) -> None:
    if not ranges:
        raise UsageError("no memory ranges to identity-map: pass at least one (start, end) range")
    for start, end in ranges:
        if not 0 <= start < end:
            raise UsageError(
                f"bad range [{start:#x}, {end:#x}) to identity-map: need 0 <= start < end"
            )
        if end > ADDRESS_LIMIT:
            raise UsageError(
                f"range [{start:#x}, {end:#x}) ends above {ADDRESS_LIMIT:#x}: identity mapping "
                "with 4-level paging needs canonical lower-half addresses; place it lower"
            )


def _merged_pages(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges as sorted, disjoint, non-adjacent [first, end) runs of 4 KiB page numbers.

    4 KiB is the finest granularity paging has, so an unaligned edge maps its whole page.
    """
    runs = sorted((start // PAGE, -(-end // PAGE)) for start, end in ranges)
    merged = [list(runs[0])]
    for first, end in runs[1:]:
        if first <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([first, end])
    return [(a, b) for a, b in merged]


def _plan(ranges: Sequence[tuple[int, int]]) -> _Plan:
    _check(ranges)
    large: list[int] = []
    small: dict[int, list[int]] = {}
    for first, end in _merged_pages(ranges):
        # Whole 2 MiB blocks inside [first, end): the block numbers [lo, hi), block 0 excluded.
        lo = max(-(-first // PAGES_PER_LARGE), 1)
        hi = end // PAGES_PER_LARGE
        if lo < hi:
            large.extend(range(lo, hi))
            edges = [(first, lo * PAGES_PER_LARGE), (hi * PAGES_PER_LARGE, end)]
        else:
            edges = [(first, end)]
        for a, b in edges:
            for page in range(a, b):
                small.setdefault(page // PAGES_PER_LARGE, []).append(page)
    return _Plan(tuple(large), {blk: tuple(pages) for blk, pages in small.items()})


def widen_within(ranges: Sequence[tuple[int, int]], within: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` with each edge moved out to a 2 MiB boundary where that stays inside the one
    ``within`` range holding it (memory the caller may map anyway, e.g. the slice's own RAM).

    Fewer 4 KiB edges means fewer PTs: the slot's page-table budget (lowmem.PAGE_TABLES_MAX) then
    holds a slice of any size.  An edge that would leave its ``within`` range, or a range inside
    none, stays as it is; nothing is widened into the first 2 MiB.
    """
    out = []
    for start, end in ranges:
        holder = next(((lo, hi) for lo, hi in within if lo <= start and end <= hi), None)
        if holder is not None:
            lo, hi = max(holder[0], LARGE_PAGE), holder[1]
            down = start // LARGE_PAGE * LARGE_PAGE
            up = -(-end // LARGE_PAGE) * LARGE_PAGE
            start = down if down >= lo else start
            end = up if up <= hi and end > LARGE_PAGE else end
        out.append((start, end))
    return out


def _indices(block: int) -> tuple[int, int, int]:
    """(PML4, PDPT, PD) indices of a 2 MiB block number: linear address bits 47:39, 38:30, 29:21."""
    return block >> 18, (block >> 9) & 0x1FF, block & 0x1FF


def page_tables_size(ranges: Sequence[tuple[int, int]]) -> int:
    """Bytes that ``build_identity_page_tables`` returns for these ranges (a multiple of 4 KiB)."""
    return PAGE * _plan(ranges).table_count()


def build_identity_page_tables(base: int, ranges: Sequence[tuple[int, int]]) -> bytes:
    """4-level page tables at physical ``base`` identity-mapping ``ranges`` and nothing else.

    Each ``[start, end)`` is mapped to 4 KiB granularity (an unaligned edge maps its whole 4 KiB
    page); overlapping ranges are fine.  2 MiB pages where a whole aligned block at or above 2 MiB
    is covered, 4 KiB pages elsewhere (module docstring).  CR3 = ``base``.  Mapped pages are
    present, writable, supervisor, PAT entry 0 (write-back unless the MTRRs say otherwise).
    """
    if base % PAGE or base < 0:
        raise UsageError(f"page table base {base:#x} is not 4 KiB aligned: align it to 0x1000")
    plan = _plan(ranges)
    size = PAGE * plan.table_count()
    if base + size > ADDRESS_LIMIT:
        raise UsageError(
            f"page tables at {base:#x} (+{size:#x}) do not fit below {ADDRESS_LIMIT:#x}"
        )

    # Physical address of each table: PML4 first, then PDPTs, PDs and PTs.
    order = [("pml4", 0)] + [("pdpt", k) for k in plan.pdpts()] + [("pd", k) for k in plan.pds()]
    order += [("pt", k) for k in plan.pts()]
    addr = {key: base + PAGE * i for i, key in enumerate(order)}

    entries = [0] * (ENTRIES * len(order))  # one flat array of 8-byte entries

    def put(table: tuple, index: int, value: int) -> None:
        entries[(addr[table] - base) // 8 + index] = value

    for l4 in plan.pdpts():
        put(("pml4", 0), l4, addr[("pdpt", l4)] | TABLE_FLAGS)
    for l4, l3 in plan.pds():
        put(("pdpt", l4), l3, addr[("pd", (l4, l3))] | TABLE_FLAGS)
    for block in plan.large:
        l4, l3, l2 = _indices(block)
        put(("pd", (l4, l3)), l2, block * LARGE_PAGE | LARGE_PAGE_FLAGS)
    for block, pages in plan.small.items():
        l4, l3, l2 = _indices(block)
        put(("pd", (l4, l3)), l2, addr[("pt", block)] | TABLE_FLAGS)
        for page in pages:
            put(("pt", block), page % ENTRIES, page * PAGE | PAGE_FLAGS)

    return struct.pack(f"<{len(entries)}Q", *entries)
