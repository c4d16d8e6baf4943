"""Huge pages for a comparison VM: reserved on one NUMA node through sysfs before QEMU starts,
given back after it ends.

Linux keeps a per-node pool of each huge page size (Documentation/admin-guide/mm/hugetlbpage.rst,
"Interaction of Task Memory Policy with Huge Page Allocation/Freeing"):
/sys/devices/system/node/nodeN/hugepages/hugepages-<KiB>kB/nr_hugepages is the pool's size and
free_hugepages what no one holds.  Writing a larger nr_hugepages asks the kernel to find that many
contiguous, aligned pages on the node; on a fragmented host it finds fewer and says so only by
the value read back, which is why every write here is read back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coreslice.errors import LaunchError, UsageError
from coreslice.vm.plan import HUGEPAGE_MOUNTS, HUGEPAGE_SIZES, Hugepages


def pool_dir(root: Path, node: int, size: str) -> Path:
    return root / f"sys/devices/system/node/node{node}/hugepages/hugepages-{HUGEPAGE_SIZES[size] >> 10}kB"


def _read(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError) as e:
        raise LaunchError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e


def _write(path: Path, value: int) -> None:
    try:
        path.write_text(f"{value}\n")
    except OSError as e:
        raise LaunchError(f"writing {value} to {path} failed: {e.strerror}") from e


def hugetlbfs_mounted(root: Path, size: str) -> bool:
    """Whether HUGEPAGE_MOUNTS[size] is a hugetlbfs of that page size (/proc/mounts: a mount without
    pagesize= has the default size, 2M on x86)."""
    want = HUGEPAGE_MOUNTS[size]
    try:
        lines = (root / "proc/mounts").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        f = line.split()
        if len(f) >= 4 and f[1] == want and f[2] == "hugetlbfs":
            opts = dict(o.split("=", 1) if "=" in o else (o, "") for o in f[3].split(","))
            return _bytes(opts.get("pagesize", "2M")) == HUGEPAGE_SIZES[size]
    return False


def _bytes(text: str) -> int | None:
    """A pagesize= value (the kernel prints it in K, M or G, e.g. 2048K, 2M, 1024M, 1G) in bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper()
    try:
        return int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)
    except ValueError:
        return None


def check(root: Path, pages: Hugepages) -> None:
    """What must hold before reserving: the pool exists on the node, its hugetlbfs is mounted."""
    d = pool_dir(root, pages.node, pages.size)
    if not (d / "nr_hugepages").exists():
        raise UsageError(f"this host has no {pages.size} huge page pool on node {pages.node} (no {d}); "
                         f"use --hugepages {'2M' if pages.size == '1G' else 'none'}")
    if not hugetlbfs_mounted(root, pages.size):
        m = HUGEPAGE_MOUNTS[pages.size]
        opt = " -o pagesize=1G" if pages.size == "1G" else ""
        raise UsageError(f"no hugetlbfs of {pages.size} pages is mounted on {m}; mount one "
                         f"(mkdir -p {m} && mount -t hugetlbfs{opt} none {m}) or use --hugepages none")


@dataclass
class Reservation:
    """Pages added to a node's pool for one VM; ``release`` puts the pool back as it was."""

    path: Path      # the pool's nr_hugepages
    before: int     # its value before the reservation
    added: int      # how many pages were added (0: enough were free already)

    def release(self) -> None:
        if self.added:
            _write(self.path, self.before)
            self.added = 0

    def to_json(self) -> dict:
        return {"pool": str(self.path), "before": self.before, "added": self.added}


def reserve(root: Path, pages: Hugepages) -> Reservation:
    """Make ``pages.count`` pages free in the node's pool, adding only what is missing; on a host
    that cannot give them all, put the pool back and say how many it could."""
    check(root, pages)
    d = pool_dir(root, pages.node, pages.size)
    nr, free = _read(d / "nr_hugepages"), _read(d / "free_hugepages")
    missing = max(0, pages.count - free)
    res = Reservation(d / "nr_hugepages", nr, 0)
    if not missing:
        return res
    _write(res.path, nr + missing)
    got = _read(res.path) - nr
    res.added = max(got, 0)
    if got < missing:
        res.release()
        hint = ("reserve them at host boot (hugepagesz=1G hugepages=N on its kernel command line)" if pages.size == "1G" else
                "free memory on the node, or reserve them at host boot (hugepages=N)")
        raise LaunchError(f"node {pages.node} could give only {free + max(got, 0)} of the {pages.count} {pages.size} "
                          f"huge pages the VM needs (memory too fragmented or too little free); {hint}, or use "
                          f"--hugepages {'2M' if pages.size == '1G' else 'none'}")
    return res
