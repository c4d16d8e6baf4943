"""Physical memory access.

/dev/mem on a stock kernel (STRICT_DEVMEM) only lets mmap() reach RAM the host does not own and
the low 1 MiB; read()/write() there are refused or see zeros, so every access goes through mmap,
one window at a time so that memory use stays flat whatever the size of the image.
"""

from __future__ import annotations

import mmap
import os
from typing import Protocol

from coreslice.errors import LaunchError

PAGE = 0x1000


class PhysicalMemory(Protocol):
    def read(self, addr: int, size: int) -> bytes: ...
    def write(self, addr: int, data: bytes | memoryview) -> None: ...
    def write_and_check(self, addr: int, data: bytes | bytearray) -> bool: ...


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
        try:
            m[off:off + len(data)] = data
            return m[off:off + len(data)] == data
        finally:
            m.close()

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

    def write_and_check(self, addr: int, data: bytes) -> bool:
        self.write(addr, data)
        return self.read(addr, len(data)) == bytes(data)
