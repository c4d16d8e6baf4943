"""DevMem's write paths against a regular file standing in for /dev/mem (mmap works the same
on both): bytes land at their physical address, file segments are copied window by window from
any offset, and a read-back that differs is reported."""

from __future__ import annotations

import os

import pytest

from coreslice.machine import physmem
from coreslice.machine.physmem import DevMem, FakeMemory


@pytest.fixture
def devmem(tmp_path):
    path = tmp_path / "mem"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    return path


def test_write_and_check_puts_bytes_at_their_address(devmem):
    m = DevMem(str(devmem))
    assert m.write_and_check(0x12345, b"coreslice")
    assert m.write_and_check(0x20000, bytearray(b"\x01\x02"))
    raw = devmem.read_bytes()
    assert raw[0x12345:0x1234E] == b"coreslice" and raw[0x20000:0x20002] == b"\x01\x02"
    assert raw.count(0) == len(raw) - 11
    m.close()


@pytest.mark.parametrize("offset, size", [(0, 100_000), (12_345, 70_000), (4096, 3 * 4096)])
def test_file_segments_are_copied_window_by_window(devmem, tmp_path, monkeypatch, offset, size):
    monkeypatch.setattr(physmem, "FILE_WINDOW", 3 * 4096)  # several windows, unaligned offsets
    src = tmp_path / "kernel"
    payload = os.urandom(offset + size + 999)
    src.write_bytes(payload)
    m = DevMem(str(devmem))
    assert m.write_file_and_check(0x100000 + 7, src, offset, size)
    got = devmem.read_bytes()[0x100007:0x100007 + size]
    assert got == payload[offset:offset + size]
    m.close()


def test_a_source_shorter_than_the_segment_is_an_error(devmem, tmp_path):
    src = tmp_path / "short"
    src.write_bytes(b"x" * 100)
    with pytest.raises(physmem.LaunchError, match="shrank"):
        DevMem(str(devmem)).write_file_and_check(0, src, 0, 200)


def test_fake_memory_records_file_segments_like_real_writes(tmp_path):
    src = tmp_path / "k"
    src.write_bytes(bytes(range(256)) * 10)
    fake = FakeMemory()
    assert fake.write_file_and_check(0x5000, src, 6, 1000)
    assert fake.read(0x5000, 1000) == src.read_bytes()[6:1006] and fake.writes


def test_zero_maps_one_chunk_at_a_time(tmp_path, monkeypatch):
    """/dev/mem mappings fill their page tables at mmap time: zero() must not map a whole large
    slice at once.  A regular file stands in for /dev/mem."""
    from coreslice.machine import physmem

    f = tmp_path / "mem"
    f.write_bytes(b"\xaa" * (64 * 4096))
    monkeypatch.setattr(physmem, "ZERO_CHUNK", 8 * 4096)
    mem = physmem.DevMem(str(f))
    sizes = []
    real_map = mem._map
    monkeypatch.setattr(mem, "_map", lambda a, n: (sizes.append(n), real_map(a, n))[1])
    done = []
    mem.zero(4096, 40 * 4096, lambda d, t: done.append(d))
    mem.close()
    data = f.read_bytes()
    assert data[:4096] == b"\xaa" * 4096 and data[4096:41 * 4096] == bytes(40 * 4096)
    assert data[41 * 4096:] == b"\xaa" * (23 * 4096)
    assert max(sizes) == 8 * 4096 and done[-1] == 40 * 4096
