"""vm/hugepages.py: reserving a node's huge pages through a fake sysfs tree, and giving them back."""

from __future__ import annotations

import pytest

from coreslice.errors import LaunchError, UsageError
from coreslice.vm import hugepages as hp
from coreslice.vm.plan import Hugepages

MOUNT_2M = "hugetlbfs /dev/hugepages hugetlbfs rw,nosuid,nodev,relatime,pagesize=2M 0 0\n"
MOUNT_1G = "none /dev/hugepages1G hugetlbfs rw,relatime,pagesize=1024M 0 0\n"


def hugetree(root, nr=10, free=3, size="2M", node=0, mounts=MOUNT_2M):
    """A node's pool of ``size`` pages and /proc/mounts; returns the pool's nr_hugepages."""
    d = hp.pool_dir(root, node, size)
    d.mkdir(parents=True)
    (d / "nr_hugepages").write_text(f"{nr}\n")
    (d / "free_hugepages").write_text(f"{free}\n")
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc/mounts").write_text("proc /proc proc rw 0 0\n" + mounts)
    return d / "nr_hugepages"


def test_enough_free_pages_writes_nothing(tmp_path, monkeypatch):
    nr = hugetree(tmp_path, nr=10, free=8)
    monkeypatch.setattr(hp, "_write", lambda path, value: pytest.fail(f"wrote {value} to {path}"))
    res = hp.reserve(tmp_path, Hugepages("2M", 8, 0))
    assert (res.path, res.before, res.added) == (nr, 10, 0)
    res.release()
    assert nr.read_text() == "10\n"


def test_missing_pages_are_added_and_given_back(tmp_path):
    nr = hugetree(tmp_path, nr=10, free=3)
    res = hp.reserve(tmp_path, Hugepages("2M", 8, 0))
    assert nr.read_text() == "15\n" and res.to_json() == {"pool": str(nr), "before": 10, "added": 5}
    res.release()
    assert nr.read_text() == "10\n" and res.added == 0


def test_1g_pool_on_its_own_mount(tmp_path):
    nr = hugetree(tmp_path, nr=0, free=0, size="1G", node=1, mounts=MOUNT_2M + MOUNT_1G)
    assert nr.parent.name == "hugepages-1048576kB"
    res = hp.reserve(tmp_path, Hugepages("1G", 2, 1))
    assert nr.read_text() == "2\n" and res.added == 2


def test_fragmented_host_gives_fewer_pages_and_the_pool_is_restored(tmp_path, monkeypatch):
    nr = hugetree(tmp_path, nr=10, free=3)
    real = hp._write
    writes = []

    def kernel(path, value):  # the kernel finds only 2 more pages: nr_hugepages reads back 12
        writes.append(value)
        real(path, min(value, 12))
    monkeypatch.setattr(hp, "_write", kernel)
    with pytest.raises(LaunchError, match="could give only 5 of the 8 2M huge pages"):
        hp.reserve(tmp_path, Hugepages("2M", 8, 0))
    assert writes == [15, 10] and nr.read_text() == "10\n"


def test_no_pool_on_the_node(tmp_path):
    hugetree(tmp_path, node=0)
    with pytest.raises(UsageError, match="no 2M huge page pool on node 1"):
        hp.reserve(tmp_path, Hugepages("2M", 1, 1))


@pytest.mark.parametrize("mounts", ["", "tmpfs /dev/hugepages tmpfs rw 0 0\n",
                                    "hugetlbfs /dev/hugepages hugetlbfs rw,pagesize=1G 0 0\n"])
def test_no_hugetlbfs_of_that_size_mounted(tmp_path, mounts):
    nr = hugetree(tmp_path, mounts=mounts)
    with pytest.raises(UsageError, match="mount"):
        hp.reserve(tmp_path, Hugepages("2M", 8, 0))
    assert nr.read_text() == "10\n"


@pytest.mark.parametrize("line, size, mounted", [
    ("hugetlbfs /dev/hugepages hugetlbfs rw,relatime 0 0", "2M", True),   # default size: 2M
    ("hugetlbfs /dev/hugepages hugetlbfs rw,relatime 0 0", "1G", False),  # not /dev/hugepages1G
    ("none /dev/hugepages1G hugetlbfs rw,pagesize=1G 0 0", "1G", True),
    ("none /dev/hugepages1G hugetlbfs rw,pagesize=1048576K 0 0", "1G", True),
    ("none /dev/hugepages1G hugetlbfs rw,relatime 0 0", "1G", False),     # default (2M) pages there
    ("none /dev/hugepages1G tmpfs rw,pagesize=1G 0 0", "1G", False),
])
def test_hugetlbfs_mounted(tmp_path, line, size, mounted):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/mounts").write_text(line + "\n")
    assert hp.hugetlbfs_mounted(tmp_path, size) is mounted


def test_no_proc_mounts(tmp_path):
    assert hp.hugetlbfs_mounted(tmp_path, "2M") is False
