"""A synthetic slice kernel in physical memory: VMCOREINFO note, KASLR-style page tables and a
printk ring buffer with a small writer that follows kernel/printk/printk_ringbuffer.c
(prb_reserve / data_alloc / data_push_tail / desc_push_tail / prb_final_commit), so tests can
wrap the rings, leave a record reserved, or recycle one while the reader copies.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from coreslice.machine.physmem import FakeMemory

START_KERNEL_MAP = 0xFFFFFFFF80000000
ID_MASK = (1 << 62) - 1
U64 = (1 << 64) - 1
RESERVED, COMMITTED, FINALIZED, REUSABLE = 0, 1, 2, 3
FAILED_LPOS, NO_LPOS = 1, 3
MIB = 1 << 20

# Linux 6.12's layout (printk_ringbuffer.h); ``shuffled`` moves fields to prove the reader asks VMCOREINFO.
LAYOUT = {
    "SIZE(printk_ringbuffer)": 88, "OFFSET(printk_ringbuffer.desc_ring)": 0,
    "OFFSET(printk_ringbuffer.text_data_ring)": 48, "OFFSET(printk_ringbuffer.fail)": 80,
    "SIZE(prb_desc_ring)": 48, "OFFSET(prb_desc_ring.count_bits)": 0, "OFFSET(prb_desc_ring.descs)": 8,
    "OFFSET(prb_desc_ring.infos)": 16, "OFFSET(prb_desc_ring.head_id)": 24, "OFFSET(prb_desc_ring.tail_id)": 32,
    "SIZE(prb_desc)": 24, "OFFSET(prb_desc.state_var)": 0, "OFFSET(prb_desc.text_blk_lpos)": 8,
    "SIZE(prb_data_blk_lpos)": 16, "OFFSET(prb_data_blk_lpos.begin)": 0, "OFFSET(prb_data_blk_lpos.next)": 8,
    "SIZE(printk_info)": 88, "OFFSET(printk_info.seq)": 0, "OFFSET(printk_info.ts_nsec)": 8,
    "OFFSET(printk_info.text_len)": 16, "OFFSET(printk_info.caller_id)": 20, "OFFSET(printk_info.dev_info)": 24,
    "SIZE(prb_data_ring)": 32, "OFFSET(prb_data_ring.size_bits)": 0, "OFFSET(prb_data_ring.data)": 8,
    "OFFSET(prb_data_ring.head_lpos)": 16, "OFFSET(prb_data_ring.tail_lpos)": 24,
    "SIZE(atomic_long_t)": 8, "OFFSET(atomic_long_t.counter)": 0,
}
SHUFFLED = {**LAYOUT, "SIZE(prb_desc)": 32, "OFFSET(prb_desc.state_var)": 24, "OFFSET(prb_desc.text_blk_lpos)": 0,
            "OFFSET(printk_ringbuffer.desc_ring)": 40, "OFFSET(printk_ringbuffer.text_data_ring)": 0,
            "SIZE(printk_ringbuffer)": 96, "SIZE(printk_info)": 96, "OFFSET(printk_info.seq)": 8,
            "OFFSET(printk_info.ts_nsec)": 0}


def note(text: str) -> bytes:
    """An Elf64_Nhdr VMCOREINFO note holding ``text`` (kernel/vmcore_info.c append_elf_note)."""
    desc = text.encode()
    return struct.pack("<III", 11, len(desc), 0) + b"VMCOREINFO\x00\x00" + desc + bytes(-len(desc) % 4)


@dataclass
class SliceKernel:
    """``levels`` 4 or 5; ``layout`` the struct offsets; sizes small so that the rings wrap."""

    mem_base: int = 0x40000000
    mem_size: int = 64 * MIB
    kernel_offset: int = 0x2D400000          # KASLR: virtual offset of the image
    direct_map: int = 0xFFFFA0C480000000     # page_offset_base, randomized (not 0xffff888000000000)
    levels: int = 4
    sme_mask: int = 0
    count_bits: int = 4                      # 16 descriptors
    size_bits: int = 9                       # 512 bytes of text
    layout: dict = field(default_factory=lambda: dict(LAYOUT))
    osrelease: str = "6.12.38+deb12-amd64"
    note_at: int | None = None               # physical; default inside the RAM, 4-byte aligned only

    def __post_init__(self):
        self.mem = FakeMemory()
        B = self.mem_base
        self.image_phys = B + 16 * MIB
        self.image_virt = 0xFFFFFFFF81000000 + self.kernel_offset
        self.phys_base = self.image_phys - (self.image_virt - START_KERNEL_MAP)
        self._next_table = B + 40 * MIB
        self.pgd = self.image_phys + 0x100000           # init_top_pgt, in the image
        self.prb_sym = self.image_virt + 0x200000       # struct printk_ringbuffer *prb
        self.rb_virt = self.image_virt + 0x200100       # printk_rb_dynamic
        self.rb_phys = self._image_pa(self.rb_virt)
        # descs in the direct map (1 GiB leaves)
        self.descs_phys = B + 48 * MIB
        self.descs_virt = self.direct_map + self.descs_phys
        self._map_1g(self.direct_map + B, B)
        # infos through 4 KiB pages, across a page boundary onto a lower physical page
        vm = self._vmalloc_base()
        self.infos_virt = vm + 0x1000 - 700
        self._map_4k(vm, B + 50 * MIB)
        self._map_4k(vm + 0x1000, B + 49 * MIB)
        self.infos_pages = [(vm, B + 50 * MIB), (vm + 0x1000, B + 49 * MIB)]
        # the text ring across two 2 MiB leaves that are not contiguous physically
        self.text_virt = vm + 0x40000000 + 0x200000 - 256
        self._map_2m(vm + 0x40000000, B + 20 * MIB)
        self._map_2m(vm + 0x40200000, B + 26 * MIB)
        self._init_ring()
        self.mem.write(self._image_pa(self.prb_sym), struct.pack("<Q", self.rb_virt))
        self.note_phys = self.note_at if self.note_at is not None else B + 30 * MIB + 0x7A4
        self.mem.write(self.note_phys, note(self.vmcoreinfo_text()))
        self.mem.writes.clear()

    # -- addresses and page tables --------------------------------------------------------------
    def _image_pa(self, v: int) -> int:
        return v - START_KERNEL_MAP + self.phys_base

    def _vmalloc_base(self) -> int:
        return 0xFFA0000000000000 if self.levels == 5 else 0xFFFFC90000000000

    def _table(self) -> int:
        t = self._next_table
        self._next_table += 0x1000
        return t

    def _entry(self, table: int, index: int) -> int:
        return struct.unpack("<Q", self.mem.read(table + 8 * index, 8))[0]

    def _set(self, table: int, index: int, value: int) -> None:
        self.mem.write(table + 8 * index, struct.pack("<Q", value | self.sme_mask))

    def _walk_to(self, vaddr: int, level: int) -> int:
        """The table at ``level`` (1 = PTE) for ``vaddr``, creating tables on the way."""
        table = self.pgd
        for lv in range(self.levels, level, -1):
            idx = (vaddr >> (12 + 9 * (lv - 1))) & 0x1FF
            e = self._entry(table, idx)
            if not e & 1:
                nt = self._table()
                self._set(table, idx, nt | 0x63)
                e = nt
            table = e & 0x000FFFFFFFFFF000 & ~self.sme_mask
        return table

    def _map_1g(self, v: int, p: int) -> None:
        self._set(self._walk_to(v, 3), (v >> 30) & 0x1FF, p | 0xE3)

    def _map_2m(self, v: int, p: int) -> None:
        self._set(self._walk_to(v, 2), (v >> 21) & 0x1FF, p | 0xE3)

    def _map_4k(self, v: int, p: int) -> None:
        self._set(self._walk_to(v, 1), (v >> 12) & 0x1FF, p | 0x63)

    def virt_to_phys(self, v: int) -> int:
        if v >= START_KERNEL_MAP:
            return self._image_pa(v)
        if self.descs_virt <= v < self.descs_virt + (1 << 30):
            return v - self.direct_map
        for pv, pp in self.infos_pages:
            if pv <= v < pv + 0x1000:
                return pp + v - pv
        base = self._vmalloc_base() + 0x40000000
        if base <= v < base + 0x200000:
            return self.mem_base + 20 * MIB + v - base
        if base + 0x200000 <= v < base + 0x400000:
            return self.mem_base + 26 * MIB + v - base - 0x200000
        raise AssertionError(hex(v))

    def vwrite(self, v: int, data: bytes) -> None:
        for i, b in enumerate(data):  # byte by byte: the pieces may sit on different pages
            self.mem.write(self.virt_to_phys(v + i), bytes([b]))

    def vread(self, v: int, n: int) -> bytes:
        return b"".join(self.mem.read(self.virt_to_phys(v + i), 1) for i in range(n))

    # -- VMCOREINFO ---------------------------------------------------------------------------
    def vmcoreinfo_text(self) -> str:
        lines = [f"OSRELEASE={self.osrelease}", "BUILD-ID=0123456789abcdef", "PAGESIZE=4096",
                 f"SYMBOL(init_top_pgt)={self.image_virt + 0x100000:x}", f"SYMBOL(prb)={self.prb_sym:x}",
                 f"SYMBOL(printk_rb_static)={self.rb_virt + 0x1000:x}", f"NUMBER(phys_base)={self.phys_base}",
                 f"NUMBER(pgtable_l5_enabled)={1 if self.levels == 5 else 0}",
                 f"KERNELOFFSET={self.kernel_offset:x}", f"NUMBER(KERNEL_IMAGE_SIZE)={1 << 30}",
                 f"NUMBER(sme_mask)={self.sme_mask}"]
        lines += [f"{k}={v}" for k, v in self.layout.items()]
        return "\n".join(lines) + "\n"

    # -- the ring -----------------------------------------------------------------------------
    def _o(self, key: str) -> int:
        return self.layout[key]

    @property
    def count(self) -> int:
        return 1 << self.count_bits

    @property
    def dsize(self) -> int:
        return 1 << self.size_bits

    def _desc(self, idx: int) -> int:
        return self.descs_phys + idx * self._o("SIZE(prb_desc)")

    def _info(self, idx: int) -> int:
        return self.infos_virt + idx * self._o("SIZE(printk_info)")

    def set_sv(self, idx: int, rid: int, state: int) -> None:
        self.mem.write(self._desc(idx) + self._o("OFFSET(prb_desc.state_var)"), struct.pack("<Q", (state << 62) | rid))

    def sv(self, idx: int) -> tuple[int, int]:
        v = struct.unpack("<Q", self.mem.read(self._desc(idx) + self._o("OFFSET(prb_desc.state_var)"), 8))[0]
        return v & ID_MASK, v >> 62

    def _set_lpos(self, idx: int, begin: int, nxt: int) -> None:
        a = self._desc(idx) + self._o("OFFSET(prb_desc.text_blk_lpos)")
        self.mem.write(a + self._o("OFFSET(prb_data_blk_lpos.begin)"), struct.pack("<Q", begin & U64))
        self.mem.write(a + self._o("OFFSET(prb_data_blk_lpos.next)"), struct.pack("<Q", nxt & U64))

    def _lpos(self, idx: int) -> tuple[int, int]:
        a = self._desc(idx) + self._o("OFFSET(prb_desc.text_blk_lpos)")
        b = struct.unpack("<Q", self.mem.read(a + self._o("OFFSET(prb_data_blk_lpos.begin)"), 8))[0]
        n = struct.unpack("<Q", self.mem.read(a + self._o("OFFSET(prb_data_blk_lpos.next)"), 8))[0]
        return b, n

    def _info_seq(self, idx: int) -> int:
        return struct.unpack("<Q", self.vread(self._info(idx) + self._o("OFFSET(printk_info.seq)"), 8))[0]

    def _rb_field(self, ring: str, name: str) -> int:
        base = self.rb_phys + self._o(f"OFFSET(printk_ringbuffer.{ring})")
        off = self._o(f"OFFSET({'prb_desc_ring' if ring == 'desc_ring' else 'prb_data_ring'}.{name})")
        return base + off

    def _get(self, ring: str, name: str) -> int:
        return struct.unpack("<Q", self.mem.read(self._rb_field(ring, name), 8))[0]

    def _put(self, ring: str, name: str, value: int, fmt: str = "<Q") -> None:
        self.mem.write(self._rb_field(ring, name), struct.pack(fmt, value & (U64 if fmt == "<Q" else 0xFFFFFFFF)))

    def _init_ring(self) -> None:
        """DEFINE_PRINTKRB / prb_init: the last descriptor is the reusable bootstrap head and tail."""
        desc0 = (-(self.count + 1)) & ID_MASK
        self._put("desc_ring", "count_bits", self.count_bits, "<I")
        self._put("desc_ring", "descs", self.descs_virt)
        self._put("desc_ring", "infos", self.infos_virt)
        self._put("desc_ring", "head_id", desc0)
        self._put("desc_ring", "tail_id", desc0)
        self._put("text_data_ring", "size_bits", self.size_bits, "<I")
        self._put("text_data_ring", "data", self.text_virt)
        self._put("text_data_ring", "head_lpos", -self.dsize)
        self._put("text_data_ring", "tail_lpos", -self.dsize)
        self.vwrite(self._info(0) + self._o("OFFSET(printk_info.seq)"), struct.pack("<Q", (-self.count) & U64))
        self.set_sv(self.count - 1, desc0, REUSABLE)
        self._set_lpos(self.count - 1, FAILED_LPOS, FAILED_LPOS)

    def _wraps(self, lpos: int) -> int:
        return (lpos & U64) >> self.size_bits

    def _push_data_tail(self, lpos: int) -> None:
        """data_push_tail: make the descriptors of blocks before ``lpos`` reusable, move the tail."""
        tail = self._get("text_data_ring", "tail_lpos")
        while ((lpos - tail) & U64) - 1 < self.dsize:
            rid = struct.unpack("<Q", self.vread(self.text_virt + (tail & (self.dsize - 1)), 8))[0]
            idx = rid & (self.count - 1)
            did, state = self.sv(idx)
            begin, nxt = self._lpos(idx)
            assert did == rid and state in (FINALIZED, REUSABLE) and begin == tail, "writer blocked"
            self.set_sv(idx, rid, REUSABLE)
            tail = nxt
        self._put("text_data_ring", "tail_lpos", tail)

    def reserve(self, text: str, ts_nsec: int, level: int = 6) -> int:
        """prb_reserve + the text written: returns the id, left in the reserved state."""
        head = self._get("desc_ring", "head_id")
        rid = (head + 1) & ID_MASK
        if ((rid - self.count) & ID_MASK) == self._get("desc_ring", "tail_id"):  # desc_push_tail
            tail = self._get("desc_ring", "tail_id")
            tidx = tail & (self.count - 1)
            did, state = self.sv(tidx)
            assert state in (FINALIZED, REUSABLE), "writer blocked by a reserved tail"
            self.set_sv(tidx, tail, REUSABLE)
            b, n = self._lpos(tidx)
            if not (b & 1):
                self._push_data_tail(n)
            self._put("desc_ring", "tail_id", (tail + 1) & ID_MASK)
        self._put("desc_ring", "head_id", rid)
        idx = rid & (self.count - 1)
        self.set_sv(idx, rid, RESERVED)
        old_seq = self._info_seq(idx)
        seq = idx if (old_seq == 0 and idx != 0) else (old_seq + self.count) & U64
        if seq > 0:  # desc_make_final of the previous one
            pidx = (rid - 1) & (self.count - 1)
            pid, pstate = self.sv(pidx)
            if pid == ((rid - 1) & ID_MASK) and pstate == COMMITTED:
                self.set_sv(pidx, pid, FINALIZED)
        body = text.encode()
        info = bytearray(self._o("SIZE(printk_info)"))
        struct.pack_into("<Q", info, self._o("OFFSET(printk_info.seq)"), seq)
        struct.pack_into("<Q", info, self._o("OFFSET(printk_info.ts_nsec)"), ts_nsec)
        struct.pack_into("<H", info, self._o("OFFSET(printk_info.text_len)"), len(body))
        info[self._o("OFFSET(printk_info.text_len)") + 3] = level << 5
        self.vwrite(self._info(idx), bytes(info))
        if not body:
            self._set_lpos(idx, NO_LPOS, NO_LPOS)
            return rid
        size = (len(body) + 8 + 7) & ~7
        begin = self._get("text_data_ring", "head_lpos")
        nxt = (begin + size) & U64
        if self._wraps(begin) != self._wraps(nxt):
            nxt = ((nxt & ~(self.dsize - 1)) + size) & U64
        self._push_data_tail((nxt - self.dsize) & U64)
        self._put("text_data_ring", "head_lpos", nxt)
        self.vwrite(self.text_virt + (begin & (self.dsize - 1)), struct.pack("<Q", rid))
        at = begin if self._wraps(begin) == self._wraps(nxt) else 0
        if at == 0:
            self.vwrite(self.text_virt, struct.pack("<Q", rid))
        self.vwrite(self.text_virt + (at & (self.dsize - 1)) + 8, body)
        self._set_lpos(idx, begin, nxt)
        return rid

    def finalize(self, rid: int) -> None:
        self.set_sv(rid & (self.count - 1), rid, FINALIZED)

    def printk(self, text: str, ts_nsec: int, level: int = 6) -> int:
        rid = self.reserve(text, ts_nsec, level)
        self.finalize(rid)
        return rid
