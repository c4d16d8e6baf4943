"""Physical memory access.

/dev/mem on a stock kernel (STRICT_DEVMEM) only lets mmap() reach RAM the host does not own and
the low 1 MiB; read()/write() there are refused or see zeros, so every access goes through mmap,
one window at a time so that memory use stays flat whatever the size of the image.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path
from typing import Protocol

from coreslice.errors import LaunchError

PAGE = 0x1000


class PhysicalMemory(Protocol):
    def read(self, addr: int, size: int) -> bytes: ...
    def write(self, addr: int, data: bytes | memoryview) -> None: ...
    def write_and_check(self, addr: int, data: bytes | bytearray) -> bool: ...
    def write_file_and_check(self, addr: int, path: Path, offset: int, size: int) -> bool: ...
    def zero(self, addr: int, size: int, progress=None) -> None: ...


# Zeroing goes a chunk at a time through one mapping, so progress can be told on large ranges.
ZERO_CHUNK = 256 << 20


# The bulk copy and its read-back use libc's memmove and memcmp on the mappings themselves: a
# Python slice assignment plus a compare through a fresh bytes object touches every byte three
# times (file -> buffer -> mapping -> copy), which made the loader's write 2.8x its floor.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_libc.memcmp.restype = ctypes.c_int
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value
# Source files are mapped a window at a time: their page-cache pages count in the loader's RSS
# while mapped, so a window bounds memory use whatever the initrd's size.
FILE_WINDOW = 8 << 20


class DevMem:
    """mmap windows of /dev/mem.  Open lazily so that merely constructing it touches nothing.

    RAM is mapped write-back (no O_SYNC): it is ordinary memory, coherent with the CPU that will
    read it, and an uncached mapping makes every store a bus transaction (x86 PAT gives O_SYNC
    mappings of /dev/mem UC-).  Device registers, such as the local APIC page, need
    ``uncached=True``.
    """

    def __init__(self, path: str = "/dev/mem", uncached: bool = False):
        self.path = path
        self.uncached = uncached
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            try:
                flags = os.O_RDWR | (os.O_SYNC if self.uncached else 0)
                self._fd = os.open(self.path, flags)
            except OSError as e:
                raise LaunchError(f"cannot open {self.path}: {e.strerror}; run as root on a kernel with /dev/mem") from e
        return self._fd

    def _map(self, addr: int, size: int) -> tuple[mmap.mmap, int]:
        start = addr & ~(PAGE - 1)
        length = ((addr + size + PAGE - 1) & ~(PAGE - 1)) - start
        try:
            m = mmap.mmap(self._open(), length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except OSError as e:
            raise LaunchError(
                f"cannot map physical 0x{addr:x}-0x{addr + size:x} through {self.path}: {e.strerror}; "
                "is the range host System RAM (check mem= on the host command line)?") from e
        return m, addr - start

    def read(self, addr: int, size: int) -> bytes:
        m, off = self._map(addr, size)
        try:
            return m[off:off + size]
        finally:
            m.close()

    def write(self, addr: int, data: bytes | memoryview) -> None:
        m, off = self._map(addr, len(data))
        try:
            m[off:off + len(data)] = data
        finally:
            m.close()

    def write_and_check(self, addr: int, data: bytes | bytearray) -> bool:
        """Write, then read back through the same mapping; True when the bytes stuck."""
        m, off = self._map(addr, len(data))
        view = ctypes.c_char.from_buffer(m, off)
        buf = None
        try:
            dst = ctypes.addressof(view)
            if isinstance(data, bytes):
                src = data  # ctypes passes a bytes object's own buffer
            else:
                buf = (ctypes.c_char * len(data)).from_buffer(data)
                src = ctypes.addressof(buf)
            ctypes.memmove(dst, src, len(data))
            return _libc.memcmp(dst, src, len(data)) == 0
        finally:
            del view, buf  # ctypes views export their buffers: drop them before closing
            m.close()

    def write_file_and_check(self, addr: int, path: Path, offset: int, size: int) -> bool:
        """Copy ``size`` bytes of ``path`` from ``offset`` to ``addr`` and compare them back:
        one mapping of the destination, the file mapped read-only a window at a time, one
        memmove and one memcmp per window (no copy through Python buffers)."""
        m, off = self._map(addr, size)
        dst = ctypes.c_char.from_buffer(m, off)
        fd = -1
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            if os.fstat(fd).st_size < offset + size:
                raise LaunchError(f"{path} shrank to {os.fstat(fd).st_size} bytes while being written; "
                                  "do not change the kernel or initrd while coreslice boots")
            base = ctypes.addressof(dst)
            pos = 0
            while pos < size:
                n = min(FILE_WINDOW, size - pos)
                start = (offset + pos) & ~(mmap.ALLOCATIONGRANULARITY - 1)
                length = offset + pos + n - start
                src = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED | mmap.MAP_POPULATE, fd, start)
                if src in (None, _MAP_FAILED):
                    e = ctypes.get_errno()
                    raise LaunchError(f"cannot map {path} to copy it: {os.strerror(e)}")
                try:
                    s = src + offset + pos - start
                    ctypes.memmove(base + pos, s, n)
                    if _libc.memcmp(base + pos, s, n) != 0:
                        return False
                finally:
                    _libc.munmap(src, length)
                pos += n
            return True
        finally:
            if fd >= 0:
                os.close(fd)
            del dst
            m.close()

    def zero(self, addr: int, size: int, progress=None) -> None:
        """Zero [addr, addr + size) with libc memset, one mapping per ZERO_CHUNK (a /dev/mem
        mapping has its page-table entries filled at mmap time: 2 MiB of host page tables per
        GiB mapped, so one mapping of a large slice would cost the small host dearly);
        ``progress(done, size)`` after each chunk."""
        done = 0
        while done < size:
            n = min(ZERO_CHUNK, size - done)
            m, off = self._map(addr + done, n)
            view = ctypes.c_char.from_buffer(m, off)
            try:
                ctypes.memset(ctypes.addressof(view), 0, n)
            finally:
                del view
                m.close()
            done += n
            if progress is not None:
                progress(done, size)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class FakeMemory:
    """Sparse in-memory physical memory that records every write, for tests."""

    def __init__(self, preset: dict[int, bytes] | None = None):
        self.pages: dict[int, bytearray] = {}
        self.writes: list[tuple[int, int]] = []
        for addr, data in (preset or {}).items():
            self._store(addr, data)

    def _store(self, addr: int, data: bytes | memoryview) -> None:
        data = bytes(data)
        pos = 0
        while pos < len(data):
            a = addr + pos
            page = self.pages.setdefault(a & ~(PAGE - 1), bytearray(PAGE))
            off = a & (PAGE - 1)
            n = min(PAGE - off, len(data) - pos)
            page[off:off + n] = data[pos:pos + n]
            pos += n

    def read(self, addr: int, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            a = addr + len(out)
            page = self.pages.get(a & ~(PAGE - 1), bytes(PAGE))
            off = a & (PAGE - 1)
            out += page[off:off + min(PAGE - off, size - len(out))]
        return bytes(out)

    def write(self, addr: int, data: bytes | memoryview) -> None:
        self.writes.append((addr, len(data)))
        self._store(addr, data)

    def zero(self, addr: int, size: int, progress=None) -> None:
        self.writes.append((addr, size))
        end = addr + size
        for page in [p for p in self.pages if addr <= p and p + PAGE <= end]:
            del self.pages[page]  # an absent page reads as zeros
        for a in {addr & ~(PAGE - 1), (end - 1) & ~(PAGE - 1)}:  # partial pages at the ends
            if a in self.pages:
                lo, hi = max(addr, a), min(end, a + PAGE)
                self.pages[a][lo - a:hi - a] = bytes(hi - lo)
        if progress is not None:
            progress(size, size)

    def write_and_check(self, addr: int, data: bytes) -> bool:
        self.write(addr, data)
        return self.read(addr, len(data)) == bytes(data)

    def write_file_and_check(self, addr: int, path: Path, offset: int, size: int) -> bool:
        with open(path, "rb") as f:
            f.seek(offset)
            pos = 0
            while pos < size:  # in pieces, as the real one does
                data = f.read(min(FILE_WINDOW, size - pos))
                if not data:
                    raise LaunchError(f"{path} shrank while being written (at byte {offset + pos})")
                if not self.write_and_check(addr + pos, data):
                    return False
                pos += len(data)
        return True
