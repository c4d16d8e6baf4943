"""A minimal writer for the ``newc`` cpio format that the kernel unpacks as an initramfs.

Written in Python rather than driving ``cpio(1)`` so that device nodes (``/dev/console``) can be
put in the archive without ``mknod`` and the output is byte-for-byte deterministic (fixed
mtimes, ownership and inode numbers).  Format: Linux ``Documentation/driver-api/early-userspace/
buffer-format.rst`` -- a 110-byte ASCII header ("070701" + 13 eight-digit hex fields), the
NUL-terminated name padded to 4 bytes, the data padded to 4 bytes, and a ``TRAILER!!!`` entry.
"""

from __future__ import annotations

import gzip
import io
import stat

_MAGIC = b"070701"


class CpioWriter:
    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1
        self._names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        if name in self._names:
            raise ValueError(f"cpio: duplicate entry {name!r}")
        self._names.add(name)
        encoded = name.encode() + b"\0"
        fields = [
            self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0,
        ]
        self._ino += 1
        header = _MAGIC + b"".join(b"%08X" % f for f in fields)
        self._buf.write(header + encoded)
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._buf.getvalue()


def read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """Parse a (decompressed) newc archive into ``{name: (mode, data)}``; used by tests."""
    out: dict[str, tuple[int, bytes]] = {}
    off = 0
    while True:
        if data[off : off + 6] != _MAGIC:
            raise ValueError(f"cpio: bad magic at {off}")
        f = [int(data[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        off += 110
        name = data[off : off + namesize - 1].decode()
        off += namesize
        off += -off % 4
        body = data[off : off + size]
        off += size
        off += -off % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)
