"""Identity-mapping page tables for the trampoline's switch to long mode.

Intel SDM Vol. 3A §4.5 (4-level paging): CR3 -> PML4 -> PDPT -> PD; a PD entry with PS=1 maps a
2 MiB page directly (§4.5.4), so no page tables (PTs) are needed. The Linux 64-bit boot protocol
(Documentation/arch/x86/boot.rst, "64-bit Boot Protocol") only asks that the kernel, the zero page
and the command line be identity mapped; the kernel builds its own tables right after entry.

Layout at physical ``base`` (all tables 4 KiB, packed with no gaps)::

    base + 0x0000   PML4                 (CR3 = base)
    base + 0x1000   PDPT for the lowest PML4 slot in use, then the next ...
    ...             PD for the lowest (PML4, PDPT) slot in use, then the next ...

Pure functions: they return bytes and write nothing.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from coreslice.boot.layout import MIB, PAGE
from coreslice.errors import UsageError

LARGE_PAGE = 2 * MIB  # mapped by one PDE with PS=1 (SDM §4.5.4)
ENTRIES = 512  # 8-byte entries per 4 KiB table

# Identity mapping means virtual == physical, and a 4-level virtual address must be canonical
# (bits 63:47 all equal, SDM Vol. 1 §3.3.7.1), so the lower half, [0, 2^47), is the most we can
# map.
# Real MAXPHYADDR is often smaller (46 bits on many Intel servers); the caller knows the host.
ADDRESS_LIMIT = 1 << 47

# Entry flag bits (SDM Vol. 3A §4.5.4, the PML4E, PDPTE and 2 MiB-page PDE formats).
P = 1 << 0  # present
RW = 1 << 1  # writable (CR0.WP aside, supervisor writes are allowed either way)
PS = 1 << 7  # in a PDE: this entry maps a 2 MiB page

TABLE_FLAGS = P | RW
LARGE_PAGE_FLAGS = P | RW | PS


def _large_pages(ranges: Sequence[tuple[int, int]]) -> list[int]:
    """Sorted, de-duplicated 2 MiB page numbers covering every range, rounded out."""
    if not ranges:
        raise UsageError("no memory ranges to identity-map: pass at least one (start, end) range")
    pages: set[int] = set()
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
        first = start // LARGE_PAGE
        last = (end + LARGE_PAGE - 1) // LARGE_PAGE  # exclusive, rounded out
        pages.update(range(first, last))
    return sorted(pages)


def _indices(page: int) -> tuple[int, int, int]:
    """(PML4, PDPT, PD) indices of a 2 MiB page number: linear address bits 47:39, 38:30, 29:21."""
    return page >> 18, (page >> 9) & 0x1FF, page & 0x1FF


def _table_keys(pages: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Which PDPTs (by PML4 index) and PDs (by PML4, PDPT index) are needed, in address order."""
    pdpts = sorted({_indices(p)[0] for p in pages})
    pds = sorted({_indices(p)[:2] for p in pages})
    return pdpts, pds


def page_tables_size(ranges: Sequence[tuple[int, int]]) -> int:
    """Bytes that ``build_identity_page_tables`` returns for these ranges (a multiple of 4 KiB)."""
    pdpts, pds = _table_keys(_large_pages(ranges))
    return PAGE * (1 + len(pdpts) + len(pds))


def build_identity_page_tables(base: int, ranges: Sequence[tuple[int, int]]) -> bytes:
    """4-level page tables at physical ``base`` identity-mapping ``ranges`` with 2 MiB pages.

    Every ``[start, end)`` range is rounded out to 2 MiB boundaries; overlapping ranges are fine.
    CR3 = ``base``. Mapped pages are present, writable, supervisor, write-back (PWT=PCD=0).
    """
    if base % PAGE or base < 0:
        raise UsageError(f"page table base {base:#x} is not 4 KiB aligned: align it to 0x1000")
    pages = _large_pages(ranges)
    pdpts, pds = _table_keys(pages)
    size = PAGE * (1 + len(pdpts) + len(pds))
    if base + size > ADDRESS_LIMIT:
        raise UsageError(
            f"page tables at {base:#x} (+{size:#x}) do not fit below {ADDRESS_LIMIT:#x}"
        )

    # Physical address of each table: PML4 first, then PDPTs, then PDs.
    pdpt_addr = {k: base + PAGE * (1 + i) for i, k in enumerate(pdpts)}
    pd_addr = {k: base + PAGE * (1 + len(pdpts) + i) for i, k in enumerate(pds)}

    entries = [0] * (ENTRIES * (size // PAGE))  # one flat array of 8-byte entries

    def slot(table_addr: int, index: int) -> int:
        return (table_addr - base) // 8 + index

    for l4, addr in pdpt_addr.items():
        entries[slot(base, l4)] = addr | TABLE_FLAGS
    for (l4, l3), addr in pd_addr.items():
        entries[slot(pdpt_addr[l4], l3)] = addr | TABLE_FLAGS
    for page in pages:
        l4, l3, l2 = _indices(page)
        entries[slot(pd_addr[(l4, l3)], l2)] = page * LARGE_PAGE | LARGE_PAGE_FLAGS

    return struct.pack(f"<{len(entries)}Q", *entries)
