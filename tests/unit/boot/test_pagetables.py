"""Identity page tables: walk the built bytes like the MMU does (SDM Vol. 3A §4.5)."""

import struct

import pytest

from coreslice.boot import lowmem
from coreslice.boot.layout import MIB, PAGE
from coreslice.boot.pagetables import (
    LARGE_PAGE,
    build_identity_page_tables,
    page_tables_size,
    widen_within,
)
from coreslice.errors import UsageError

P, RW, PS = 1, 2, 0x80
ADDR_MASK = 0x000F_FFFF_FFFF_F000  # bits 51:12 of a table entry


def entry(tables: bytes, base: int, table: int, index: int) -> int:
    assert base <= table < base + len(tables), f"table {table:#x} outside the built tables"
    assert table % PAGE == 0
    return struct.unpack_from("<Q", tables, table - base + 8 * index)[0]


def walk(tables: bytes, base: int, va: int) -> int | None:
    """Translate ``va`` with CR3 = base; None if not present. Checks flags on the way."""
    table = base
    for shift in (39, 30):  # PML4E, PDPTE
        e = entry(tables, base, table, va >> shift & 0x1FF)
        if not e & P:
            return None
        assert e & ~ADDR_MASK == P | RW, f"non-leaf entry {e:#x}: only P and RW expected"
        table = e & ADDR_MASK
    pde = entry(tables, base, table, va >> 21 & 0x1FF)
    if not pde & P:
        return None
    if pde & PS:
        assert pde & ~ADDR_MASK == P | RW | PS, f"PDE {pde:#x}: a 2 MiB page, P RW PS only"
        assert pde & ADDR_MASK & (LARGE_PAGE - 1) == 0
        return (pde & ADDR_MASK) | (va & (LARGE_PAGE - 1))
    assert pde & ~ADDR_MASK == P | RW, f"PDE {pde:#x} to a PT: only P and RW expected"
    pte = entry(tables, base, pde & ADDR_MASK, va >> 12 & 0x1FF)
    if not pte & P:
        return None
    assert pte & ~ADDR_MASK == P | RW, f"PTE {pte:#x}: P and RW only (PAT, PCD, PWT clear)"
    return (pte & ADDR_MASK) | (va & (PAGE - 1))


def mappings(tables: bytes, base: int) -> list[tuple[int, int, int]]:
    """Every page the tables map, as (virtual address, size, physical address), from an
    exhaustive walk in address order."""
    out = []
    for i4 in range(512):
        e4 = entry(tables, base, base, i4)
        if not e4 & P:
            continue
        for i3 in range(512):
            e3 = entry(tables, base, e4 & ADDR_MASK, i3)
            if not e3 & P:
                continue
            for i2 in range(512):
                e2 = entry(tables, base, e3 & ADDR_MASK, i2)
                va2 = i4 << 39 | i3 << 30 | i2 << 21
                if not e2 & P:
                    continue
                if e2 & PS:
                    out.append((va2, LARGE_PAGE, e2 & ADDR_MASK))
                    continue
                for i1 in range(512):
                    e1 = entry(tables, base, e2 & ADDR_MASK, i1)
                    if e1 & P:
                        out.append((va2 | i1 << 12, PAGE, e1 & ADDR_MASK))
    return out


def covered(ranges) -> list[tuple[int, int]]:
    """The 4 KiB pages touching any range, as sorted disjoint [start, end) runs."""
    pages = sorted({p for s, e in ranges for p in range(s // PAGE, -(-e // PAGE))})
    runs: list[list[int]] = []
    for p in pages:
        if runs and runs[-1][1] == p * PAGE:
            runs[-1][1] += PAGE
        else:
            runs.append([p * PAGE, (p + 1) * PAGE])
    return [tuple(r) for r in runs]


def check_exact(ranges, base=0x10_0000) -> list[tuple[int, int, int]]:
    """The tables identity-map exactly the 4 KiB pages of ``ranges``: nothing past a range's
    end or before its start, no large page below 2 MiB, and the size is as announced."""
    tables = build_identity_page_tables(base, ranges)
    assert len(tables) == page_tables_size(ranges)
    maps = mappings(tables, base)
    runs: list[list[int]] = []
    for va, size, pa in maps:
        assert va == pa, f"{va:#x} is not identity mapped"
        assert va % size == 0
        if size == LARGE_PAGE:
            assert va >= LARGE_PAGE, "a 2 MiB page over the first 2 MiB (fixed-range MTRRs)"
        if runs and runs[-1][1] == va:
            runs[-1][1] += size
        else:
            runs.append([va, va + size])
    assert [tuple(r) for r in runs] == covered(ranges)
    return maps


LOW_AND_HIGH = [(0x0, 0x20_0000), (0x1_0000_0000, 0x1_0200_0000)]


def test_low_and_high_ranges_are_identity_mapped():
    base = 0x10_0000
    tables = build_identity_page_tables(base, LOW_AND_HIGH)
    # 1 PML4, 1 PDPT (both ranges under PML4 slot 0), 2 PDs (1 GiB slots 0 and 4), 1 PT (the
    # first 2 MiB, in 4 KiB pages)
    assert len(tables) == page_tables_size(LOW_AND_HIGH) == 5 * PAGE
    for va in (0x0, 0x7000, 0x1F_FFFF, 0x1_0000_0000, 0x1_0100_0200, 0x1_01FF_FFF8):
        assert walk(tables, base, va) == va
    for va in (0x20_0000, 0x4000_0000, 0xFFFF_F000, 0x1_0200_0000, 0x8000_0000_0000 - 8):
        assert walk(tables, base, va) is None
    maps = check_exact(LOW_AND_HIGH, base)
    assert [m for m in maps if m[1] == LARGE_PAGE] == [(0x1_0000_0000 + i * LARGE_PAGE, LARGE_PAGE,
                                                        0x1_0000_0000 + i * LARGE_PAGE) for i in range(16)]
    assert len([m for m in maps if m[1] == PAGE]) == 512


def test_unaligned_edges_are_mapped_with_4k_pages_and_nothing_past_them():
    base = 0x5000
    ranges = [(0x1F_F000, 0x40_1000)]  # 4 KiB below 2 MiB, then all of 2-4 MiB, then 4 KiB
    tables = build_identity_page_tables(base, ranges)
    maps = check_exact(ranges, base)
    assert maps == [(0x1F_F000, PAGE, 0x1F_F000), (0x20_0000, LARGE_PAGE, 0x20_0000),
                    (0x40_0000, PAGE, 0x40_0000)]
    assert walk(tables, base, 0x1F_EFFF) is None and walk(tables, base, 0x40_1000) is None
    # 1 PML4, 1 PDPT, 1 PD, 2 PTs (the blocks at 0 and 4 MiB)
    assert len(tables) == 5 * PAGE


def test_the_trampoline_page_below_1mib_gets_one_4k_page():
    """The first MiB is split by the fixed-range MTRRs (VGA hole at 0xA0000 ...): a large page
    there would span several memory types (SDM Vol. 3A §11.11.9)."""
    maps = check_exact([(0x20000, 0x21000)])
    assert maps == [(0x20000, PAGE, 0x20000)]


def test_a_range_ending_below_a_2mib_boundary_does_not_map_past_its_end():
    """E.g. the slice's top at 0x4000_0000 + 511 MiB: nothing of the host's memory above it."""
    top = 0x4000_0000 + 511 * MIB
    maps = check_exact([(top - 64 * 1024, top)])
    assert maps[-1][0] + maps[-1][1] == top and len(maps) == 16


def test_unaligned_byte_ranges_round_to_their_4k_pages_only():
    maps = check_exact([(0x40_0123, 0x40_2001)])
    assert [va for va, _, _ in maps] == [0x40_0000, 0x40_1000, 0x40_2000]


def test_end_on_a_boundary_maps_nothing_more_and_overlaps_merge():
    base = 0x1000
    ranges = [(0x20_0000, 0x60_0000), (0x40_0000, 0x60_0000), (0x20_0000, 0x20_0001)]
    tables = build_identity_page_tables(base, ranges)
    assert [va for va, _, _ in check_exact(ranges, base)] == [0x20_0000, 0x40_0000]
    assert len(tables) == page_tables_size(ranges) == 3 * PAGE


def test_two_ranges_that_together_fill_a_block_get_one_large_page():
    ranges = [(0x60_0000, 0x70_0000), (0x70_0000, 0x80_0000)]
    assert check_exact(ranges) == [(0x60_0000, LARGE_PAGE, 0x60_0000)]


def test_tables_are_packed_pml4_then_pdpts_then_pds_then_pts():
    base = 0x8_0000
    far = 0x3FFF_FFE0_0000  # the last 2 MiB below 2^46: PML4 slot 127
    ranges = [(far, far + LARGE_PAGE), (0x3FE0_0000, 0x4020_0000), (0x0, 0x1000)]
    tables = build_identity_page_tables(base, ranges)
    # PML4 + 2 PDPTs (slots 0, 127) + 3 PDs (0/0, 0/1 across the 1 GiB line, 127/511) + 1 PT
    assert len(tables) == page_tables_size(ranges) == 7 * PAGE
    pml4e = [entry(tables, base, base, i) & ADDR_MASK for i in (0, 127)]
    assert pml4e == [base + 0x1000, base + 0x2000]
    pdpte = [
        entry(tables, base, base + 0x1000, 0) & ADDR_MASK,
        entry(tables, base, base + 0x1000, 1) & ADDR_MASK,
        entry(tables, base, base + 0x2000, 511) & ADDR_MASK,
    ]
    assert pdpte == [base + 0x3000, base + 0x4000, base + 0x5000]
    assert entry(tables, base, base + 0x3000, 0) & ADDR_MASK == base + 0x6000  # the PT, last
    assert [va for va, _, _ in check_exact(ranges, base)] == [0x0, 0x3FE0_0000, 0x4000_0000, far]
    for va in (far, far + LARGE_PAGE - 1, 0x3FFF_FFFF, 0x4000_0000, 0x401F_FFFF, 0xFFF):
        assert walk(tables, base, va) == va
    assert walk(tables, base, 0x4020_0000) is None and walk(tables, base, 0x1000) is None


def test_every_table_page_is_referenced_once():
    base = 0x10_0000
    ranges = [(0, 1 << 31), (1 << 40, (1 << 40) + 0x10_0000), (0x8000_3000, 0x8000_5000)]
    tables = build_identity_page_tables(base, ranges)
    referenced = []
    for i4 in range(512):
        e4 = entry(tables, base, base, i4)
        if e4 & P:
            referenced.append(e4 & ADDR_MASK)
            for i3 in range(512):
                e3 = entry(tables, base, e4 & ADDR_MASK, i3)
                if e3 & P:
                    referenced.append(e3 & ADDR_MASK)
                    for i2 in range(512):
                        e2 = entry(tables, base, e3 & ADDR_MASK, i2)
                        if e2 & P and not e2 & PS:
                            referenced.append(e2 & ADDR_MASK)
    expected = [base + PAGE * i for i in range(1, len(tables) // PAGE)]
    assert sorted(referenced) == expected
    assert len(tables) == page_tables_size(ranges)


# What plan/boot.py asks for: the trampoline page, the kernel from its 2 MiB-aligned load address
# to load + init_size, and the loader data (64 KiB-aligned) up to the slice's top.
def plan_ranges(mem_base: int, mem_size: int, init_size: int = 56 * MIB, slot: int = 0x20000):
    top = mem_base + mem_size
    data = top - 64 * 1024
    return [(slot, slot + PAGE), (mem_base, mem_base + init_size + 0x1234), (data, top)]


@pytest.mark.parametrize("mem_base, mem_size", [(0x4000_0000, 512 * MIB), (0x1_0000_0000, 1 << 30)])
def test_a_slice_within_one_gib_fits_the_slot_budget(mem_base, mem_size):
    ranges = plan_ranges(mem_base, mem_size)
    check_exact(ranges)
    # PML4, PDPT, PD + PT for the trampoline page, PD for the slice, PT for the kernel's end, PT
    # for the data's start
    assert page_tables_size(ranges) == 7 * PAGE <= lowmem.PAGE_TABLES_MAX


@pytest.mark.parametrize("mem_base, mem_size", [(2 << 30, 2 << 30), (8 << 30, 4 << 30)])
def test_a_larger_slice_needs_one_table_more_than_the_slot_holds(mem_base, mem_size):
    """Kernel and loader data in different GiBs: a PD each, and a PT for each 4 KiB edge, which
    is one page more than the slot's budget.  widen_within (below) is the way out."""
    assert page_tables_size(plan_ranges(mem_base, mem_size)) == 8 * PAGE > lowmem.PAGE_TABLES_MAX


@pytest.mark.parametrize("mem_base, mem_size", [(0x4000_0000, 512 * MIB), (2 << 30, 2 << 30),
                                                (8 << 30, 4 << 30), ((1 << 39) - (1 << 30), 2 << 30)])
def test_widening_within_the_slice_fits_any_slice_in_the_budget(mem_base, mem_size):
    slice_ram = (mem_base, mem_base + mem_size)
    ranges = plan_ranges(mem_base, mem_size)
    wide = widen_within(ranges, [slice_ram])
    assert wide[0] == ranges[0]  # the trampoline page: in no slice range, so as it was
    for (s0, e0), (s1, e1) in zip(ranges[1:], wide[1:]):
        assert slice_ram[0] <= s1 <= s0 < e0 <= e1 <= slice_ram[1]
        assert s1 % LARGE_PAGE == 0 and e1 % LARGE_PAGE == 0
    check_exact(wide)
    # PML4, PDPT(s), PD + PT for the trampoline page, a PD each for the kernel and the data
    assert page_tables_size(wide) <= 7 * PAGE == lowmem.PAGE_TABLES_MAX


def test_widening_stops_at_the_edge_of_the_memory_it_may_use():
    top = 0x4000_0000 + 511 * MIB  # not 2 MiB aligned: the last 1 MiB stays in 4 KiB pages
    wide = widen_within([(top - 0x1_0000, top), (0x1234_5000, 0x1234_6000), (0x1F_0000, 0x30_0000)],
                        [(0x4000_0000, top), (0x10_0000, 0x60_0000)])
    assert wide == [(top - MIB, top), (0x1234_5000, 0x1234_6000), (0x1F_0000, 0x40_0000)]


def test_deterministic_and_base_relative():
    a = build_identity_page_tables(0x1000, LOW_AND_HIGH)
    assert a == build_identity_page_tables(0x1000, list(reversed(LOW_AND_HIGH)))
    b = build_identity_page_tables(0x2000, LOW_AND_HIGH)
    assert walk(b, 0x2000, 0x1_0000_1234) == 0x1_0000_1234
    assert walk(b, 0x2000, 0x1234) == 0x1234
    assert a != b  # table pointers follow the base


@pytest.mark.parametrize("base", [0x1001, 0x800, -0x1000])
def test_unaligned_base_is_refused(base):
    with pytest.raises(UsageError, match="align"):
        build_identity_page_tables(base, LOW_AND_HIGH)


@pytest.mark.parametrize(
    "ranges", [[], [(0x2000, 0x2000)], [(0x3000, 0x1000)], [(-1, 0x1000)], [(0, 1 << 48)]]
)
def test_bad_ranges_are_refused(ranges):
    with pytest.raises(UsageError):
        build_identity_page_tables(0x1000, ranges)
    with pytest.raises(UsageError):
        page_tables_size(ranges)
