"""Module load order, the cpio writer and initramfs building/caching (on a fake kernel tree)."""

import gzip
import lzma
import stat

import pytest

from coreslice.testbed import initramfs
from coreslice.testbed.cpio import CpioWriter, read_newc
from coreslice.testbed.kernels import Kernel
from coreslice.testbed.tools import ToolError

DEP = """\
kernel/arch/x86/kernel/msr.ko.xz:
kernel/fs/netfs/netfs.ko.xz:
kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
kernel/net/9p/9pnet.ko.xz: kernel/fs/netfs/netfs.ko.xz
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
kernel/net/9p/9pnet_rdma.ko.xz: kernel/drivers/x/rdma_cm.ko.xz kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz
"""


def test_load_order_dependencies_first():
    order = initramfs.module_load_order(DEP, ("9p",))
    assert order == ["kernel/fs/netfs/netfs.ko.xz", "kernel/net/9p/9pnet.ko.xz", "kernel/fs/9p/9p.ko.xz"]
    order = initramfs.module_load_order(DEP, initramfs.HOST_MODULES)
    names = [p.rsplit("/", 1)[1].split(".ko")[0] for p in order]
    assert names == ["netfs", "9pnet", "9pnet_virtio", "9p", "msr"]


def test_unknown_module_named():
    with pytest.raises(ToolError, match="nosuch"):
        initramfs.module_load_order(DEP, ("nosuch",))


def test_cpio_roundtrip_and_device_nodes():
    w = CpioWriter()
    w.directory("dev")
    w.char_device("dev/console", 5, 1)
    w.file("init", b"#!/bin/sh\n", mode=0o755)
    w.symlink("bin/sh", "busybox")
    data = w.finish()
    assert len(data) % 4 == 0
    entries = read_newc(data)
    assert stat.S_ISCHR(entries["dev/console"][0])
    assert entries["init"] == (stat.S_IFREG | 0o755, b"#!/bin/sh\n")
    assert entries["bin/sh"][1] == b"busybox"
    # rdev major/minor of the console are in the header fields.
    off = data.index(b"dev/console") - 110
    assert data[off + 6 + 8 * 9: off + 6 + 8 * 11] == b"0000000500000001"


def test_cpio_duplicate_rejected():
    w = CpioWriter()
    w.directory("a")
    with pytest.raises(ValueError):
        w.directory("a")


@pytest.fixture
def fake_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("CORESLICE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "k"
    mods = root / "lib/modules/6.12.0-test"
    for rel in DEP.split():
        rel = rel.rstrip(":")
        p = mods / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(lzma.compress(b"\x7fELF module " + rel.encode()))
    (mods / "modules.dep").write_text(DEP)
    (root / "boot").mkdir()
    (root / "boot/vmlinuz-6.12.0-test").write_bytes(b"bz")
    return Kernel("1", "linux-image-6.12.0-test", "6.12.0-test", root / "boot/vmlinuz-6.12.0-test", mods)




def test_host_initramfs_contents_and_cache(fake_kernel):
    path = initramfs.build_host_initramfs(fake_kernel)
    assert path.name.startswith("host-6.12.0-test-") and path.name.endswith(".cpio.gz")
    entries = read_newc(gzip.decompress(path.read_bytes()))
    assert entries["init"][1].decode() == initramfs.host_init_text()
    assert entries["lib/modules/9p.ko"][1] == b"\x7fELF module kernel/fs/9p/9p.ko.xz"
    assert {"lib/modules/netfs.ko", "lib/modules/msr.ko", "lib/modules/9pnet_virtio.ko"} <= set(entries)
    assert "lib/modules/9pnet_rdma.ko" not in entries
    assert stat.S_ISCHR(entries["dev/console"][0])
    assert entries["bin/sh"][1] == b"busybox"
    mtime = path.stat().st_mtime_ns
    assert initramfs.build_host_initramfs(fake_kernel) == path  # cached
    assert path.stat().st_mtime_ns == mtime
    assert not list(path.parent.glob(".*tmp"))


def test_slice_initramfs(fake_kernel):
    path = initramfs.build_slice_initramfs(fake_kernel)
    entries = read_newc(gzip.decompress(path.read_bytes()))
    assert entries["init"][1].decode() == initramfs.slice_init_text()
    assert stat.S_ISCHR(entries["dev/kmsg"][0])
    assert not any(n.endswith(".ko") for n in entries)
