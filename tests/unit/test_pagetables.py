"""Identity page tables: walk the built bytes like the MMU does (SDM Vol. 3A §4.5)."""

import struct

import pytest

from coreslice.boot.layout import PAGE
from coreslice.boot.pagetables import (
    LARGE_PAGE,
    build_identity_page_tables,
    page_tables_size,
)
from coreslice.errors import UsageError

P, RW, PS = 1, 2, 0x80
ADDR_MASK = 0x000F_FFFF_FFFF_F000  # bits 51:12 of a table entry


def entry(tables: bytes, base: int, table: int, index: int) -> int:
    assert base <= table < base + len(tables), f"table {table:#x} outside the built tables"
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
    assert pde & ~ADDR_MASK == P | RW | PS, f"PDE {pde:#x}: expected a 2 MiB page (PS)"
    assert pde & ADDR_MASK & (LARGE_PAGE - 1) == 0
    return (pde & ADDR_MASK) | (va & (LARGE_PAGE - 1))


def mapped_pages(tables: bytes, base: int) -> list[int]:
    """Every 2 MiB page the tables map (virtual addresses), from an exhaustive walk."""
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
                if entry(tables, base, e3 & ADDR_MASK, i2) & P:
                    out.append(i4 << 39 | i3 << 30 | i2 << 21)
    return out


LOW_AND_HIGH = [(0x0, 0x20_0000), (0x1_0000_0000, 0x1_0200_0000)]


def test_low_and_high_ranges_are_identity_mapped():
    base = 0x10_0000
    tables = build_identity_page_tables(base, LOW_AND_HIGH)
    # 1 PML4, 1 PDPT (both ranges under PML4 slot 0), 2 PDs (1 GiB slots 0 and 4)
    assert len(tables) == page_tables_size(LOW_AND_HIGH) == 4 * PAGE
    for va in (0x0, 0x7000, 0x1F_FFFF, 0x1_0000_0000, 0x1_0100_0200, 0x1_01FF_FFF8):
        assert walk(tables, base, va) == va
    for va in (0x20_0000, 0x4000_0000, 0xFFFF_F000, 0x1_0200_0000, 0x8000_0000_0000 - 8):
        assert walk(tables, base, va) is None
    high = [0x1_0000_0000 + i * LARGE_PAGE for i in range(16)]
    assert mapped_pages(tables, base) == [0x0, *high]


def test_ranges_are_rounded_out_to_2mib():
    base = 0x5000
    tables = build_identity_page_tables(base, [(0x1F_F000, 0x20_1000)])
    assert mapped_pages(tables, base) == [0x0, 0x20_0000]
    assert walk(tables, base, 0x3F_FFFF) == 0x3F_FFFF
    assert walk(tables, base, 0x40_0000) is None


def test_end_on_a_boundary_maps_nothing_more_and_overlaps_merge():
    base = 0x1000
    ranges = [(0x20_0000, 0x60_0000), (0x40_0000, 0x60_0000), (0x20_0000, 0x20_0001)]
    tables = build_identity_page_tables(base, ranges)
    assert mapped_pages(tables, base) == [0x20_0000, 0x40_0000]
    assert len(tables) == page_tables_size(ranges) == 3 * PAGE


def test_tables_are_packed_pml4_then_pdpts_then_pds():
    base = 0x8_0000
    far = 0x3FFF_FFE0_0000  # the last 2 MiB below 2^46: PML4 slot 127
    ranges = [(far, far + LARGE_PAGE), (0x3FE0_0000, 0x4020_0000), (0x0, 0x1000)]
    tables = build_identity_page_tables(base, ranges)
    # PML4 + 2 PDPTs (slots 0, 127) + 3 PDs (0/0, 0/1 across the 1 GiB line, 127/511)
    assert len(tables) == page_tables_size(ranges) == 6 * PAGE
    pml4e = [entry(tables, base, base, i) & ADDR_MASK for i in (0, 127)]
    assert pml4e == [base + 0x1000, base + 0x2000]
    pdpte = [
        entry(tables, base, base + 0x1000, 0) & ADDR_MASK,
        entry(tables, base, base + 0x1000, 1) & ADDR_MASK,
        entry(tables, base, base + 0x2000, 511) & ADDR_MASK,
    ]
    assert pdpte == [base + 0x3000, base + 0x4000, base + 0x5000]
    assert mapped_pages(tables, base) == [0x0, 0x3FE0_0000, 0x4000_0000, far]
    for va in (far, far + LARGE_PAGE - 1, 0x3FFF_FFFF, 0x4000_0000, 0x401F_FFFF):
        assert walk(tables, base, va) == va
    assert walk(tables, base, 0x4020_0000) is None


def test_every_table_page_is_referenced_once():
    base = 0x10_0000
    ranges = [(0, 1 << 31), (1 << 40, (1 << 40) + 0x10_0000)]
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
    expected = [base + PAGE * i for i in range(1, len(tables) // PAGE)]
    assert sorted(referenced) == expected
    assert len(tables) == page_tables_size(ranges)


def test_deterministic_and_base_relative():
    a = build_identity_page_tables(0x1000, LOW_AND_HIGH)
    assert a == build_identity_page_tables(0x1000, list(reversed(LOW_AND_HIGH)))
    b = build_identity_page_tables(0x2000, LOW_AND_HIGH)
    assert walk(b, 0x2000, 0x1_0000_1234) == 0x1_0000_1234
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
