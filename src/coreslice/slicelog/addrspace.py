"""Kernel virtual -> physical addresses of an x86-64 Linux, from its VMCOREINFO and its own page tables.

Two rules (arch/x86/include/asm/page_64.h, __phys_addr and __phys_addr_symbol):
- the kernel image, mapped at __START_KERNEL_map (KASLR moves it inside that 1 GiB window, and
  ``phys_base`` carries where it sits physically): phys = vaddr - __START_KERNEL_map + phys_base;
- everything else, notably the direct map whose base (page_offset_base) KASLR randomizes and
  VMCOREINFO does not export: a walk of the kernel's page tables, rooted at init_top_pgt
  (arch/x86/kernel/head_64.S), 4 levels, or 5 when NUMBER(pgtable_l5_enabled)=1, with 1 GiB and
  2 MiB leaves (PS bit) as the direct map uses them.

Every physical address is checked to lie in the slice's RAM: a pointer that leads elsewhere is
garbage (or an early-boot state), never something to read through /dev/mem.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from coreslice.slicelog.vmcoreinfo import LogUnreadable, VmcoreInfo

Read = Callable[[int, int], bytes]

START_KERNEL_MAP = 0xFFFFFFFF80000000
KERNEL_IMAGE_SIZE = 1 << 30           # NUMBER(KERNEL_IMAGE_SIZE) overrides; 1 GiB with KASLR
PRESENT = 1 << 0
PAGE_SIZE_BIT = 1 << 7                # PS: a 1 GiB (level 3) or 2 MiB (level 2) leaf
ADDR_MASK = 0x000FFFFFFFFFF000        # bits 12-51 of an entry: the next table or the page
PAGE = 0x1000


class AddressSpace:
    """Reads of a kernel's virtual memory through ``read`` (physical) within [mem_base, mem_end)."""

    def __init__(self, read: Read, info: VmcoreInfo, mem_base: int, mem_size: int):
        self._read = read
        self.mem_base, self.mem_end = mem_base, mem_base + mem_size
        self.phys_base = info.number("phys_base")
        self.image_size = info.number("KERNEL_IMAGE_SIZE", KERNEL_IMAGE_SIZE)
        self.levels = 5 if info.number("pgtable_l5_enabled", 0) == 1 else 4
        # AMD SME: the encryption bit is set in page-table entries; it is no address bit.
        self.entry_mask = ADDR_MASK & ~info.number("sme_mask", 0)
        self.root = self.image_phys(info.symbol("init_top_pgt"))
        self._tables: dict[int, bytes] = {}   # physical page -> contents (page tables stay put)

    def read_phys(self, addr: int, size: int) -> bytes:
        if not (self.mem_base <= addr and addr + size <= self.mem_end):
            raise LogUnreadable(f"the slice kernel points at physical 0x{addr:x}-0x{addr + size:x}, outside its "
                                f"RAM 0x{self.mem_base:x}-0x{self.mem_end:x}; its memory does not hold what "
                                "VMCOREINFO describes (early boot, or a damaged kernel)")
        return self._read(addr, size)

    def in_image(self, vaddr: int) -> bool:
        return START_KERNEL_MAP <= vaddr < START_KERNEL_MAP + self.image_size

    def image_phys(self, vaddr: int) -> int:
        return vaddr - START_KERNEL_MAP + self.phys_base

    def _entry(self, table: int, index: int) -> int:
        page = self._tables.get(table)
        if page is None:
            page = self._tables[table] = self.read_phys(table, PAGE)
        return struct.unpack_from("<Q", page, index * 8)[0]

    def translate(self, vaddr: int) -> tuple[int, int]:
        """(physical address, bytes left in its page) for ``vaddr``."""
        if self.in_image(vaddr):
            return self.image_phys(vaddr), self.image_size - (vaddr - START_KERNEL_MAP)
        table = self.root
        for level in range(self.levels, 0, -1):
            shift = 12 + 9 * (level - 1)
            entry = self._entry(table, (vaddr >> shift) & 0x1FF)
            if not entry & PRESENT:
                raise LogUnreadable(f"kernel address 0x{vaddr:x} is not mapped in the slice kernel's page tables "
                                    "(early boot, or a damaged pointer)")
            if level == 1 or (level in (2, 3) and entry & PAGE_SIZE_BIT):
                span = 1 << shift
                frame = entry & self.entry_mask & ~(span - 1)
                off = vaddr & (span - 1)
                return frame + off, span - off
            table = entry & self.entry_mask
        raise AssertionError("unreachable")

    def read(self, vaddr: int, size: int) -> bytes:
        """``size`` bytes of kernel virtual memory, one physical read per physically contiguous run."""
        out = bytearray()
        while len(out) < size:
            start, room = self.translate(vaddr + len(out))
            n = min(room, size - len(out))
            # Grow the run while the next page follows physically (the direct map and the image do).
            while len(out) + n < size:
                nxt, nroom = self.translate(vaddr + len(out) + n)
                if nxt != start + n:
                    break
                n += min(nroom, size - len(out) - n)
            out += self.read_phys(start, n)
        return bytes(out)
