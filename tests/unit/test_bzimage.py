"""Setup-header parsing on the real Debian vmlinuz and on damaged copies of it."""

from __future__ import annotations

import shutil

import pytest

from coreslice.boot import bzimage
from coreslice.errors import UsageError


def test_real_debian_kernel(debian_kernel):
    k = bzimage.parse_bzimage(debian_kernel.vmlinuz)
    assert k.protocol >= 0x020F
    assert k.xloadflags & bzimage.XLF_KERNEL_64
    assert k.can_load_above_4g
    assert k.kernel_alignment >= 0x200000 and k.kernel_alignment & (k.kernel_alignment - 1) == 0
    assert k.init_size > k.kernel_size > 1 << 20
    assert k.cmdline_size >= 2047
    assert k.kernel_offset == (k.setup[0x1F1] + 1) * 512
    assert k.kernel_offset + k.kernel_size == debian_kernel.vmlinuz.stat().st_size
    assert debian_kernel.release in k.version_string
    hdr = k.header_bytes()
    assert hdr[0x202 - 0x1F1:0x206 - 0x1F1] == b"HdrS"


def _damaged(tmp_path, debian_kernel, mutate):
    raw = bytearray(debian_kernel.vmlinuz.read_bytes())
    raw = mutate(raw)
    p = tmp_path / "vmlinuz"
    p.write_bytes(bytes(raw))
    return p


def _set(name, value):
    def mutate(raw):
        bzimage.set_field(raw, name, value)
        return raw
    return mutate


@pytest.mark.parametrize("mutate, message", [
    (_set("header", 0x12345678), "not a bzImage"),
    (_set("boot_flag", 0), "not a bzImage"),
    (_set("version", 0x0209), "boot protocol 2.09 is too old"),
    (_set("xloadflags", 0), "no 64-bit entry"),
    (_set("relocatable_kernel", 0), "not relocatable"),
    (lambda raw: raw[:len(raw) // 2], "truncated"),
    (lambda raw: raw[:0x300], "truncated"),
    (lambda raw: raw[:100], "too short"),
])
def test_damaged_copies_are_refused(tmp_path, debian_kernel, mutate, message):
    path = _damaged(tmp_path, debian_kernel, mutate)
    with pytest.raises(UsageError, match=message) as exc:
        bzimage.parse_bzimage(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_missing_kernel(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        bzimage.parse_bzimage(tmp_path / "nope")


def test_directory_is_not_a_kernel(tmp_path):
    with pytest.raises(UsageError, match="is a directory"):
        bzimage.parse_bzimage(tmp_path)
