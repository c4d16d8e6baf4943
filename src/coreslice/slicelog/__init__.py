"""A slice kernel's log, read from its RAM on the host: no UART, nothing written.

:class:`SliceLog` finds the kernel's VMCOREINFO note (vmcoreinfo.py), translates its addresses
(addrspace.py) and reads its printk ring buffer (printk.py).  Hand-written, because no
maintained Python library reads a live kernel's printk ring from raw physical memory: drgn needs
the kernel's debug info (see vmcoreinfo.py).  Slice state from the log: state.py.
"""

from __future__ import annotations

from collections.abc import Callable

from coreslice.slicelog.addrspace import AddressSpace
from coreslice.slicelog.printk import Layout, Record, read_records
from coreslice.slicelog.vmcoreinfo import LogUnreadable, VmcoreInfo, find, note_at

__all__ = ["LogUnreadable", "Record", "SliceLog"]


class SliceLog:
    """The log of the kernel running in [mem_base, mem_base + mem_size), read through ``read``
    (physical address, size) -> bytes.  The note's address is kept (``hint``) so that later
    reads skip the scan; pass a hint from an earlier SliceLog to skip the first one too."""

    def __init__(self, read: Callable[[int, int], bytes], mem_base: int, mem_size: int, hint: int | None = None):
        self._read = read
        self.mem_base, self.mem_size = mem_base, mem_size
        self.hint = hint
        self.generation = 0  # +1 each time a (new) note is found: a new kernel restarts its seq at 0
        self._note: VmcoreInfo | None = None
        self._mem: AddressSpace | None = None
        self._layout: Layout | None = None

    def _load(self) -> tuple[VmcoreInfo, AddressSpace, Layout]:
        note = self._note
        if note is not None and note_at(self._read, note.addr) != note:
            note = None  # gone or changed (a new kernel in the same RAM): look again
        if note is None:
            note = find(self._read, self.mem_base, self.mem_size, self.hint)
            self._note, self.hint = note, note.addr
            self.generation += 1
            self._mem = AddressSpace(self._read, note, self.mem_base, self.mem_size)
            self._layout = None
        assert self._mem is not None
        if self._layout is None:
            self._layout = Layout.from_info(note)
        return note, self._mem, self._layout

    def info(self) -> dict:
        note, mem, _ = self._load()
        return {"osrelease": note.osrelease, "vmcoreinfo_addr": note.addr, "kernel_offset": note.kernel_offset,
                "phys_base": mem.phys_base, "pgtable_levels": mem.levels}

    def records(self, since_seq: int = 0) -> list[Record]:
        _, mem, layout = self._load()
        return read_records(mem, layout, since_seq)
