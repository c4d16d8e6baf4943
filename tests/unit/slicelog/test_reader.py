"""The slice log reader on a synthetic kernel in memory (kernelmem.py): VMCOREINFO found by
scanning, KASLR addresses translated through the kernel's own page tables, the printk ring read
in order while a writer wraps, holds or recycles records."""

from __future__ import annotations

import struct

import pytest

from coreslice.slicelog import LogUnreadable, SliceLog
from coreslice.slicelog import vmcoreinfo

from .kernelmem import FAILED_LPOS, FINALIZED, MIB, SHUFFLED, SliceKernel, note


def log_of(k: SliceKernel, read=None) -> SliceLog:
    return SliceLog(read or k.mem.read, k.mem_base, k.mem_size)


def texts(records) -> list[tuple[int, str]]:
    return [(r.seq, r.text) for r in records]


def live(k: SliceKernel, written: list[tuple[int, int, str]]) -> list[tuple[int, str]]:
    """What the writer says is readable: records whose descriptor is still finalized with their id."""
    out = []
    for rid, seq, text in written:
        did, state = k.sv(rid & (k.count - 1))
        if did == rid and state == FINALIZED:
            out.append((seq, text))
    return out


def write(k: SliceKernel, n: int, start: int = 0) -> list[tuple[int, int, str]]:
    written = []
    for i in range(start, start + n):
        text = f"message {i} " + "x" * (i * 7 % 41)
        rid = k.printk(text, ts_nsec=1_000_000 * (i + 1) + 1234)
        written.append((rid, k._info_seq(rid & (k.count - 1)), text))
    return written


@pytest.mark.parametrize("kernel", [
    dict(),
    dict(levels=5, direct_map=0xFF3E800000000000, kernel_offset=0x0F000000),
    dict(sme_mask=1 << 47),
    dict(layout=SHUFFLED),
    dict(mem_base=0x140000000, kernel_offset=0x3A000000),  # RAM above 4 GiB
], ids=["4-level", "5-level", "sme", "shuffled-offsets", "above-4g"])
def test_reads_the_log_in_order_through_kaslr_page_tables(kernel):
    k = SliceKernel(**kernel)
    written = write(k, 10)
    log = log_of(k)
    recs = log.records()
    assert texts(recs) == [(s, t) for _, s, t in written]
    assert [r.ts_nsec for r in recs] == [1_000_000 * (i + 1) + 1234 for i in range(10)]
    assert all(r.level == 6 for r in recs)
    info = log.info()
    assert info["osrelease"] == "6.12.38+deb12-amd64" and info["vmcoreinfo_addr"] == k.note_phys
    assert info["pgtable_levels"] == k.levels and info["kernel_offset"] == k.kernel_offset


def test_wrapped_rings_give_exactly_the_surviving_records_in_order():
    k = SliceKernel()
    written = write(k, 60)  # 16 descriptors and 512 bytes of text: both rings wrap many times
    recs = log_of(k).records()
    want = live(k, written)
    assert texts(recs) == want
    assert want and want[-1][0] == 59 and len(want) >= 5
    assert [s for s, _ in want] == list(range(want[0][0], 60))  # a contiguous tail


def test_since_seq_returns_only_newer_records():
    k = SliceKernel()
    write(k, 8)
    assert [r.seq for r in log_of(k).records(since_seq=5)] == [5, 6, 7]


def test_a_record_being_written_stops_the_read_until_it_is_finalized():
    k = SliceKernel()
    write(k, 3)
    held = k.reserve("written slowly", ts_nsec=9_000_000)  # another CPU is still writing it
    k.printk("after it", ts_nsec=9_500_000)                   # a later record, already final
    log = log_of(k)
    assert [r.seq for r in log.records()] == [0, 1, 2]        # never 4 before 3
    k.finalize(held)
    assert texts(log.records(since_seq=3)) == [(3, "written slowly"), (4, "after it")]


def test_head_still_reserved_is_not_returned():
    k = SliceKernel()
    write(k, 2)
    k.reserve("half", ts_nsec=5)
    assert [r.seq for r in log_of(k).records()] == [0, 1]


def test_a_record_recycled_while_the_text_is_copied_is_skipped_never_torn():
    k = SliceKernel()
    written = write(k, 20)
    before = live(k, written)
    text_lo = k.virt_to_phys(k.text_virt)
    fired = []

    def read(addr, n):
        # Between the reader's two copies of the descriptors: a writer on the slice recycles the
        # oldest records and writes over their text (the reader's copy of the text sees it).
        if not fired and n < MIB and addr <= text_lo < addr + n:
            fired.append(addr)
            written.extend(write(k, 3, start=100))
        return k.mem.read(addr, n)

    recs = log_of(k, read).records()
    assert fired
    got = texts(recs)
    truth = {s: t for _, s, t in written}
    assert all(truth[s] == t for s, t in got)              # nothing torn
    gone = {s for s, _ in before} - {s for s, _ in live(k, written)}
    assert gone and not gone & {s for s, _ in got}         # the recycled ones are not returned
    # The survivors among those present when the read began, in order (the new ones came later).
    assert got == [(s, t) for s, t in before if s not in gone]


def test_a_text_copy_torn_by_a_writer_is_caught_by_the_second_descriptor_copy():
    k = SliceKernel()
    written = write(k, 20)
    before = live(k, written)
    oldest = next(rid for rid, s, _ in written if s == before[0][0])
    pieces = {k.virt_to_phys(k.text_virt): 0, k.virt_to_phys(k.text_virt + 256): 256}  # two 2 MiB leaves
    torn: list[bytes] = []

    def read(addr, n):
        # The copy of the text races a writer: the oldest block's id word is copied before the
        # writer gets there, the rest after it wrote new records over the block.
        if addr not in pieces or n >= MIB:
            return k.mem.read(addr, n)
        if not torn:
            old = k.vread(k.text_virt, k.dsize)
            written.extend(write(k, 3, start=100))
            new = k.vread(k.text_virt, k.dsize)
            cut = (k._lpos(oldest & (k.count - 1))[0] & (k.dsize - 1)) + 8
            assert old[cut - 8:cut] == struct.pack("<Q", oldest) != new[cut - 8:cut]
            torn.append(old[:cut] + new[cut:])
        return torn[0][pieces[addr]:pieces[addr] + n]

    got = texts(log_of(k, read).records())
    truth = {s: t for _, s, t in written}
    assert torn and got and all(truth[s] == t for s, t in got)
    assert before[0] not in got


def test_a_descriptor_reused_between_the_two_copies_is_skipped():
    k = SliceKernel()
    written = write(k, 20)
    infos_lo = k.virt_to_phys(k.infos_virt)
    fired = []

    def read(addr, n):
        if not fired and n < MIB and addr <= infos_lo < addr + n:
            fired.append(addr)
            new.extend(write(k, 2, start=200))
        return k.mem.read(addr, n)

    new: list = []
    got = texts(log_of(k, read).records())
    truth = {s: t for _, s, t in written + new}
    assert fired and got and all(truth[s] == t for s, t in got)
    assert not {s for _, s, _ in new} & {s for s, _ in got}  # began after the read: next time


def test_empty_lines_are_read_and_lost_text_is_skipped():
    k = SliceKernel()
    k.printk("one", 1)
    k.printk("", 2)
    rid = k.printk("lost", 3)
    k._set_lpos(rid & (k.count - 1), FAILED_LPOS, FAILED_LPOS)
    k.printk("four", 4)
    assert texts(log_of(k).records()) == [(0, "one"), (1, ""), (3, "four")]


def test_a_record_prints_like_the_kernel_console():
    k = SliceKernel()
    k.printk("Linux version 6.12\nsecond line", ts_nsec=1_234_567_891)
    (r,) = log_of(k).records()
    assert r.lines() == ["[    1.234567] Linux version 6.12", "[    1.234567] second line"]


# -- VMCOREINFO -------------------------------------------------------------------------------

def test_the_note_is_found_across_a_chunk_boundary_and_parsed():
    k = SliceKernel(note_at=0x40000000 + 4 * MIB - 12)  # the header straddles a 4 MiB chunk edge
    (n,) = vmcoreinfo.scan(k.mem.read, k.mem_base, k.mem_size, chunk=4 * MIB)
    assert n.addr == k.note_phys and n.osrelease == "6.12.38+deb12-amd64"
    assert n.symbol("prb") == k.prb_sym and n.number("phys_base") == k.phys_base
    assert n.offset("prb_desc", "state_var") == 0 and n.size("printk_info") == 88


def test_the_hint_skips_the_scan():
    k = SliceKernel()
    reads = []

    def read(addr, n):
        reads.append(n)
        return k.mem.read(addr, n)

    k.printk("hello", 1)
    first = SliceLog(read, k.mem_base, k.mem_size)
    first.records()
    assert max(reads) >= vmcoreinfo.CHUNK
    reads.clear()
    again = SliceLog(read, k.mem_base, k.mem_size, hint=first.hint)
    assert texts(again.records()) == [(0, "hello")]
    assert max(reads) < vmcoreinfo.CHUNK  # no scan
    reads.clear()
    first.records()
    assert max(reads) < vmcoreinfo.CHUNK  # the found address is kept


def test_no_note_yet_is_a_clear_error():
    k = SliceKernel()
    k.mem.write(k.note_phys, bytes(64))
    with pytest.raises(LogUnreadable, match="no VMCOREINFO note in the slice's RAM yet"):
        log_of(k).records()


def test_a_note_left_by_an_earlier_kernel_is_refused_not_guessed():
    k = SliceKernel()
    k.mem.write(k.mem_base + 5 * MIB, note("OSRELEASE=6.1.0-old\nSYMBOL(prb)=ffffffff81000000\n"))
    with pytest.raises(LogUnreadable, match="2 VMCOREINFO notes in the slice's RAM"):
        log_of(k).info()


def test_a_damaged_note_header_is_ignored():
    k = SliceKernel()
    bad = bytearray(note("OSRELEASE=x\n"))
    struct.pack_into("<I", bad, 4, 1 << 20)  # n_descsz far above a page
    k.mem.write(k.mem_base + 5 * MIB, bytes(bad))
    assert log_of(k).info()["vmcoreinfo_addr"] == k.note_phys


def test_a_pointer_outside_the_slice_is_refused():
    k = SliceKernel()
    k.printk("hello", 1)
    # prb points into the direct map of memory that is not the slice's (the host's 0-1 GiB)
    k._map_1g(k.direct_map, 0)
    k.mem.write(k._image_pa(k.prb_sym), struct.pack("<Q", k.direct_map + 0x100000))
    with pytest.raises(LogUnreadable, match="outside its RAM"):
        log_of(k).records()


def test_an_unmapped_address_is_refused():
    k = SliceKernel()
    k.mem.write(k._image_pa(k.prb_sym), struct.pack("<Q", 0xFFFFD00000000000))
    with pytest.raises(LogUnreadable, match="not mapped"):
        log_of(k).records()


def test_garbage_ring_sizes_are_refused():
    k = SliceKernel()
    k._put("desc_ring", "count_bits", 60, "<I")
    with pytest.raises(LogUnreadable, match="count_bits=60"):
        log_of(k).records()


def test_a_block_that_names_another_descriptor_is_skipped():
    k = SliceKernel()
    k.printk("one", 1)
    rid = k.printk("two", 2)
    k.printk("three", 3)
    begin, _ = k._lpos(rid & (k.count - 1))
    k.vwrite(k.text_virt + (begin & (k.dsize - 1)), struct.pack("<Q", rid + 5))
    assert texts(log_of(k).records()) == [(0, "one"), (2, "three")]


def test_a_new_kernel_in_the_same_ram_is_found_again():
    k = SliceKernel()
    k.printk("first kernel", 1)
    log = log_of(k)
    assert texts(log.records()) == [(0, "first kernel")] and log.generation == 1
    # Relaunch: the RAM is scrubbed and a new kernel (another KASLR offset, note elsewhere) boots.
    k2 = SliceKernel(kernel_offset=0x11C00000, note_at=k.mem_base + 33 * MIB)
    k2.printk("second kernel", 1)
    k.mem.pages = k2.mem.pages
    assert texts(log.records()) == [(0, "second kernel")] and log.generation == 2
    assert log.hint == k2.note_phys
