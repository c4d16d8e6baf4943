"""Read the lockless printk ring buffer (Linux >= 5.10) of a running kernel from outside it.

Layout (kernel/printk/printk_ringbuffer.h): ``prb`` points to a struct printk_ringbuffer holding
a descriptor ring (count_bits, descs[], infos[], head_id, tail_id) and a text data ring
(size_bits, data[], head_lpos, tail_lpos).  Every offset and size is taken from VMCOREINFO
(log_buf_vmcoreinfo_setup in kernel/printk/printk.c), never assumed.

A descriptor's state_var packs its id (low 62 bits) and its state (top 2 bits: reserved 0,
committed 1, finalized 2, reusable 3).  Only finalized records are complete and can no longer
change (the kernel's own readers, prb_read in printk_ringbuffer.c, return nothing else).  Writers
run on the slice's CPUs while we read, so this follows the kernel's reader protocol in bulk: copy
the descriptor array, then the infos and the text, then the descriptor array again, and keep a
record only if its state_var was finalized with the expected id in both copies (a writer must take
a descriptor out of the finalized state, desc_make_reusable, before it may reuse its text).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from coreslice.slicelog.addrspace import AddressSpace
from coreslice.slicelog.vmcoreinfo import LogUnreadable, VmcoreInfo

# enum desc_state and the DESC_* macros (printk_ringbuffer.h), unsigned long = 64 bits.
RESERVED, COMMITTED, FINALIZED, REUSABLE = 0, 1, 2, 3
FLAGS_SHIFT = 62
ID_MASK = (1 << FLAGS_SHIFT) - 1
LONG_MASK = (1 << 64) - 1
FAILED_LPOS = 0x1                    # the record's text was lost (data-less)
NO_LPOS = 0x3                        # an empty line: no data block (EMPTY_LINE_LPOS in newer kernels)
BLOCK_ID = 8                         # struct prb_data_block: unsigned long id, then the text
MAX_COUNT_BITS = 24                  # 16 M records: far above any log_buf_len; more is garbage
MAX_SIZE_BITS = 31                   # LOG_BUF_LEN_MAX is 2 GiB


@dataclass(frozen=True)
class Record:
    seq: int
    ts_nsec: int
    level: int | None
    text: str

    def lines(self) -> list[str]:
        """The record as the kernel prints it on a console (print_time in printk.c): each line
        of a multi-line record carries the prefix."""
        sec, nsec = divmod(self.ts_nsec, 1_000_000_000)
        prefix = f"[{sec:5d}.{nsec // 1000:06d}] "
        return [prefix + line for line in self.text.split("\n")]

    def to_json(self) -> dict:
        return {"seq": self.seq, "ts_nsec": self.ts_nsec, "level": self.level, "text": self.text}


@dataclass(frozen=True)
class Layout:
    """Offsets and sizes from VMCOREINFO, with the ring structure's own address."""

    prb: int                 # SYMBOL(prb): the address of the pointer to the ring buffer
    rb_size: int             # SIZE(printk_ringbuffer)
    desc_ring: int           # OFFSET(printk_ringbuffer.desc_ring)
    text_ring: int           # OFFSET(printk_ringbuffer.text_data_ring)
    count_bits: int
    descs: int
    infos: int
    head_id: int
    tail_id: int
    size_bits: int
    data: int
    counter: int             # OFFSET(atomic_long_t.counter)
    desc_size: int
    state_var: int
    text_blk_lpos: int
    lpos_begin: int
    lpos_next: int
    info_size: int
    seq: int
    ts_nsec: int
    text_len: int
    caller_id: int

    @classmethod
    def from_info(cls, info: VmcoreInfo) -> "Layout":
        o = info.offset
        return cls(
            prb=info.symbol("prb"), rb_size=info.size("printk_ringbuffer"),
            desc_ring=o("printk_ringbuffer", "desc_ring"), text_ring=o("printk_ringbuffer", "text_data_ring"),
            count_bits=o("prb_desc_ring", "count_bits"), descs=o("prb_desc_ring", "descs"),
            infos=o("prb_desc_ring", "infos"), head_id=o("prb_desc_ring", "head_id"),
            tail_id=o("prb_desc_ring", "tail_id"),
            size_bits=o("prb_data_ring", "size_bits"), data=o("prb_data_ring", "data"),
            counter=o("atomic_long_t", "counter"),
            desc_size=info.size("prb_desc"), state_var=o("prb_desc", "state_var"),
            text_blk_lpos=o("prb_desc", "text_blk_lpos"),
            lpos_begin=o("prb_data_blk_lpos", "begin"), lpos_next=o("prb_data_blk_lpos", "next"),
            info_size=info.size("printk_info"), seq=o("printk_info", "seq"), ts_nsec=o("printk_info", "ts_nsec"),
            text_len=o("printk_info", "text_len"), caller_id=o("printk_info", "caller_id"),
        )


def _u64(buf: bytes, off: int) -> int:
    return struct.unpack_from("<Q", buf, off)[0]


def _u32(buf: bytes, off: int) -> int:
    return struct.unpack_from("<I", buf, off)[0]


@dataclass(frozen=True)
class Ring:
    """Where the ring's parts are, read from struct printk_ringbuffer."""

    count_bits: int
    descs: int
    infos: int
    head_id: int
    tail_id: int
    size_bits: int
    data: int


def read_ring(mem: AddressSpace, lay: Layout) -> Ring:
    rb = _u64(mem.read(lay.prb, 8), 0)
    raw = mem.read(rb, lay.rb_size)
    d, t = lay.desc_ring, lay.text_ring
    ring = Ring(count_bits=_u32(raw, d + lay.count_bits), descs=_u64(raw, d + lay.descs),
                infos=_u64(raw, d + lay.infos), head_id=_u64(raw, d + lay.head_id + lay.counter),
                tail_id=_u64(raw, d + lay.tail_id + lay.counter),
                size_bits=_u32(raw, t + lay.size_bits), data=_u64(raw, t + lay.data))
    if not (1 <= ring.count_bits <= MAX_COUNT_BITS and ring.count_bits <= ring.size_bits <= MAX_SIZE_BITS):
        raise LogUnreadable(f"the printk ring at 0x{rb:x} has count_bits={ring.count_bits}, size_bits={ring.size_bits}: "
                            "not a ring buffer (the slice's memory is not what its VMCOREINFO describes)")
    if ((ring.head_id - ring.tail_id) & ID_MASK) >= 1 << ring.count_bits:
        raise LogUnreadable(f"the printk ring's head id 0x{ring.head_id:x} is more than a ring ahead of its tail "
                            f"0x{ring.tail_id:x}; the ring is damaged")
    return ring


def _block(data: bytes, size_bits: int, begin: int, nxt: int) -> tuple[int, int] | None:
    """(offset, size) of a data block in the text ring (get_data in printk_ringbuffer.c), or None."""
    size = 1 << size_bits
    if (begin >> size_bits) == (nxt >> size_bits) and begin < nxt:      # in one wrap
        return begin & (size - 1), nxt - begin
    if (((begin + size) & LONG_MASK) >> size_bits) == (nxt >> size_bits):  # wraps: stored from index 0
        return 0, nxt & (size - 1)
    return None


def read_records(mem: AddressSpace, lay: Layout, since_seq: int = 0) -> list[Record]:
    """The finalized records with seq >= since_seq, in sequence order, up to the first record a
    writer still holds (later ones are returned by a later call, so none is ever skipped)."""
    ring = read_ring(mem, lay)
    count = 1 << ring.count_bits
    descs_len = count * lay.desc_size
    before = mem.read(ring.descs, descs_len)
    infos = mem.read(ring.infos, count * lay.info_size)
    text = mem.read(ring.data, 1 << ring.size_bits)
    after = mem.read(ring.descs, descs_len)
    # The level shares a byte with the flags after text_len and facility (struct printk_info:
    # u16 text_len; u8 facility; u8 flags:5, level:3; u32 caller_id); VMCOREINFO has no offset
    # for bit fields, so the level is given only when the exported offsets show that layout.
    level_at = lay.text_len + 3 if lay.caller_id == lay.text_len + 4 else None

    out: list[Record] = []
    n = ((ring.head_id - ring.tail_id) & ID_MASK) + 1
    for k in range(n):
        rid = (ring.tail_id + k) & ID_MASK
        idx = rid & (count - 1)
        doff = idx * lay.desc_size
        sv_a = _u64(before, doff + lay.state_var)
        sv_b = _u64(after, doff + lay.state_var)
        id_b, state_b = sv_b & ID_MASK, sv_b >> FLAGS_SHIFT
        if sv_a != sv_b:
            if id_b != rid or state_b == REUSABLE:
                continue          # recycled while we copied: that record is gone
            break                 # the writer moved it on (e.g. committed -> finalized): next time
        if id_b != rid:
            if id_b == ((rid - count) & ID_MASK):
                break             # one wrap behind: a writer is reserving it right now
            continue              # a newer id: we fell behind the tail, that record is gone
        if state_b in (RESERVED, COMMITTED):
            break                 # still being written (or may be extended): not readable yet
        if state_b == REUSABLE:
            continue              # its text may already be overwritten
        lpos = doff + lay.text_blk_lpos
        if before[lpos:lpos + 16] != after[lpos:lpos + 16]:
            continue
        begin = _u64(after, lpos + lay.lpos_begin)
        nxt = _u64(after, lpos + lay.lpos_next)
        ioff = idx * lay.info_size
        seq = _u64(infos, ioff + lay.seq)
        if seq & (count - 1) != idx:
            continue              # an info that does not belong to this descriptor
        text_len = struct.unpack_from("<H", infos, ioff + lay.text_len)[0]
        if begin & 1 and nxt & 1:  # data-less: an empty line, or text that was lost
            if begin == NO_LPOS and nxt == NO_LPOS:
                body = b""
            else:
                continue
        else:
            blk = _block(text, ring.size_bits, begin, nxt)
            if blk is None or begin % BLOCK_ID or nxt % BLOCK_ID or blk[1] < BLOCK_ID + text_len:
                continue          # an impossible block (get_data would WARN): skip, as the kernel does
            off, _size = blk
            if _u64(text, off) != rid:
                continue          # the block belongs to another descriptor: overwritten
            body = text[off + BLOCK_ID:off + BLOCK_ID + text_len]
        if seq < since_seq:
            continue
        level = infos[ioff + level_at] >> 5 if level_at is not None else None
        out.append(Record(seq=seq, ts_nsec=_u64(infos, ioff + lay.ts_nsec), level=level,
                          text=body.decode("utf-8", "replace")))
    return out
