"""The disk of a slice image: one GPT partition holding ext4, written without mounts or loops.

``sfdisk`` writes the partition table (it works on a regular file as on a device), and
``mkfs.ext4 -d TARBALL`` (e2fsprogs >= 1.47.1, through libarchive) fills the file system
straight from the root tarball, owners, modes, device nodes and xattrs included: no
extraction, so no root is needed and nothing is ever mounted.  On a file target the file
system is made at the partition's offset (``-E offset=``), and later e2fsprogs tools reach it
as ``FILE?offset=N`` (unix_io's offset option).  On a block device the partition's own node is
used.  Files the image adds after mkfs (fstab, the cloud-init seed) go in with ``debugfs -w``
and are read back.

Sizes: the partition starts at 1 MiB (the usual alignment) and ends 1 MiB before the end,
which leaves room for the backup GPT (UEFI 2.10 section 5.3: header in the last LBA, 16 KiB
of entries before it).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from coreslice.errors import CoresliceError, UsageError

MIB = 1 << 20
# The Discoverable Partitions Specification's "Root Partition (x86-64)" type.
GPT_ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
MIN_E2FSPROGS = (1, 47, 1)  # mkfs.ext4 -d takes a tarball from 1.47.1 on
LABEL_MAX = 16  # ext4 s_volume_name is 16 bytes


class DiskError(CoresliceError):
    """A disk tool failed while writing the image (exit 1)."""


@dataclass(frozen=True)
class Layout:
    """Where the root partition sits on a disk of ``disk_size`` bytes."""

    disk_size: int
    sector: int
    start: int  # bytes
    size: int  # bytes

    @property
    def blocks(self) -> int:  # 4 KiB file-system blocks
        return self.size // 4096

    def describe(self) -> dict:
        return {"disk_bytes": self.disk_size, "sector_bytes": self.sector, "partition_start": self.start,
                "partition_bytes": self.size, "partition_type": GPT_ROOT_X86_64}


def plan_layout(disk_size: int, sector: int = 512) -> Layout:
    if sector not in (512, 4096):
        raise UsageError(f"sector size {sector} is not 512 or 4096; use a disk with one of those LBA sizes")
    if disk_size < 8 * MIB:
        raise UsageError(f"a disk of {disk_size} bytes is too small for an image; give at least 8M")
    size = (disk_size - 2 * MIB) // MIB * MIB
    return Layout(disk_size, sector, MIB, size)


def sfdisk_script(layout: Layout, name: str = "root") -> str:
    """sfdisk input: a GPT with one partition of ``layout`` (in sectors)."""
    return (f"label: gpt\nsector-size: {layout.sector}\n"
            f"start={layout.start // layout.sector}, size={layout.size // layout.sector}, "
            f"type={GPT_ROOT_X86_64}, name={name}\n")


def check_label(label: str) -> str:
    if not label or len(label.encode()) > LABEL_MAX or not re.fullmatch(r"[A-Za-z0-9_.-]+", label):
        raise UsageError(f"--label {label!r}: an ext4 label is 1-{LABEL_MAX} letters, digits, '.', '_' or '-'")
    return label


def e2fsprogs_version(run=subprocess.run) -> tuple[int, ...] | None:
    try:
        out = run(["mke2fs", "-V"], capture_output=True, text=True).stderr
    except FileNotFoundError:
        return None
    m = re.search(r"mke2fs (\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x or 0) for x in m.groups()) if m else None


def check_tools(run=subprocess.run) -> None:
    """Refuse, before any write, when mkfs.ext4 cannot take a tarball."""
    v = e2fsprogs_version(run)
    if v is None or v < MIN_E2FSPROGS:
        have = ".".join(map(str, v)) if v else "none"
        raise UsageError(f"mkfs.ext4 -d needs e2fsprogs >= 1.47.1 to read a tarball (found {have}); run "
                         "scripts/install-system-deps.sh (it installs e2fsprogs from bookworm-backports)")
    for tool in ("sfdisk", "debugfs", "e2fsck"):
        if not any(os.access(Path(d) / tool, os.X_OK) for d in os.environ.get("PATH", "").split(":") + ["/sbin", "/usr/sbin"]):
            raise UsageError(f"{tool} is not installed; run scripts/install-system-deps.sh")


# -- targets ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    path: Path
    kind: str  # "file" | "block"
    size: int  # bytes the disk will have
    sector: int
    existed: bool

    def describe(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "bytes": self.size, "sector_bytes": self.sector}


def _mounted_devices(mountinfo: str) -> set[str]:
    """major:minor of every mounted file system (/proc/self/mountinfo field 3)."""
    return {line.split()[2] for line in mountinfo.splitlines() if len(line.split()) > 2}


def _block_info(dev: Path, sys_root: Path) -> tuple[str, int, int, list[str]]:
    """(name, size in bytes, logical sector size, major:minor of it and its partitions)."""
    st = os.stat(dev)
    name = Path(os.path.realpath(sys_root / f"sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")).name
    base = sys_root / "sys/class/block" / name
    size = int((base / "size").read_text()) * 512  # always 512-byte units (block/genhd.c)
    lbs = int((sys_root / "sys/block" / name / "queue/logical_block_size").read_text()) \
        if (sys_root / "sys/block" / name).exists() else 512
    devs = [(base / "dev").read_text().strip()]
    devs += [(p / "dev").read_text().strip() for p in base.iterdir() if (p / "partition").exists()]
    return name, size, lbs, devs


def check_target(path: Path, size: int | None, need: int, *, force: bool = False,
                 sys_root: Path = Path("/")) -> Target:
    """Refuse a target that cannot take the image, before anything is written: a mounted or
    busy device, a file that exists (without --force), a directory, too small a size."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UsageError(f"--target {path}: {e.strerror}; give a block device or a new file path") from None
    if st is not None and stat.S_ISBLK(st.st_mode):
        if size is not None:
            raise UsageError(f"--target {path} is a block device: the image takes its whole size; drop --size")
        name, dev_size, lbs, devs = _block_info(path, sys_root)
        mounted = _mounted_devices((sys_root / "proc/self/mountinfo").read_text()) & set(devs)
        if mounted:
            raise UsageError(f"--target {path} ({name}) or one of its partitions is mounted; unmount it "
                             "first (findmnt -S " + str(path) + ")")
        try:  # O_EXCL on a block device: EBUSY while anything holds it (a mount, swap, LVM, md)
            os.close(os.open(path, os.O_RDONLY | os.O_EXCL))
        except OSError as e:
            raise UsageError(f"--target {path} is in use ({e.strerror}); stop what holds it "
                             f"(lsblk {path}, fuser -v {path})") from None
        if dev_size < need:
            raise UsageError(f"--target {path} has {dev_size >> 20} MiB, the image needs {-(-need // MIB)} MiB; "
                             "give a larger device or namespace")
        return Target(path, "block", dev_size, lbs, True)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UsageError(f"--target {path} is neither a block device nor a regular file; give a device or a new file path")
    if st is not None and not force:
        raise UsageError(f"--target {path} exists; pass --force to overwrite it, or give a new path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"--target {path}: cannot create a file in {parent}; give a writable directory")
    if size is None:
        size = -(-need // MIB) * MIB
    elif size < need:
        raise UsageError(f"--size {size >> 20}M is too small: the root file system needs {-(-need // MIB)} MiB; "
                         "give a larger --size or leave it out")
    if size % MIB:
        raise UsageError(f"--size {size}: give a whole number of MiB, e.g. 2G")
    return Target(path, "file", size, 512, st is not None)


# -- writing ---------------------------------------------------------------------------------

Runner = Callable[..., subprocess.CompletedProcess]


def _run(argv: list[str], what: str, *, input: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, input=input, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise DiskError(f"{what} failed ({' '.join(argv[:2])}... exited {proc.returncode}): {tail}")
    return proc


def write_partition_table(target: Target, layout: Layout) -> None:
    if target.kind == "file":
        with open(target.path, "wb") as f:  # sparse: only what mkfs writes takes space
            f.truncate(target.size)
    else:
        _run(["wipefs", "-q", "-a", str(target.path)], "clearing old signatures")
    _run(["sfdisk", "-q", "--wipe", "always", str(target.path)], "writing the GPT", input=sfdisk_script(layout))


def partition_node(target: Target, deadline: float = 10.0) -> Path:
    """The block device of partition 1 (nvme0n1 -> nvme0n1p1, sda -> sda1), once udev made it."""
    name = os.path.realpath(target.path)  # /dev/disk/by-id/... -> /dev/nvme0n1
    node = Path(name + ("p1" if name[-1].isdigit() else "1"))
    _optional(["blockdev", "--rereadpt", name])
    _optional(["udevadm", "settle", "-t", str(int(deadline))])  # no udev: devtmpfs makes the node
    end = time.monotonic() + deadline
    while not node.exists():
        if time.monotonic() > end:
            raise DiskError(f"partition {node} did not appear within {deadline:.0f} s after writing the GPT; "
                            f"check dmesg, then run partprobe {name}")
        time.sleep(0.1)
    return node


def _optional(argv: list[str]) -> None:
    """A helper tool that only speeds things up: absent or failing is fine."""
    try:
        subprocess.run(argv, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        pass


def fs_spec(target: Target, layout: Layout) -> str:
    """What e2fsprogs tools open: the partition node, or FILE?offset=N."""
    if target.kind == "block":
        return str(partition_node(target))
    return f"{target.path}?offset={layout.start}"


def make_fs(target: Target, layout: Layout, tarball: Path, label: str) -> str:
    """mkfs.ext4 -d TARBALL into the partition; returns the fs spec for later tools."""
    common = ["mkfs.ext4", "-q", "-F", "-L", label, "-b", "4096", "-d", str(tarball)]
    if target.kind == "file":
        _run([*common, "-E", f"offset={layout.start}", str(target.path), f"{layout.blocks * 4}k"],
             "making the ext4 file system")
        return fs_spec(target, layout)
    node = fs_spec(target, layout)
    _run([*common, node], "making the ext4 file system")
    return node


def check_fs(spec: str) -> None:
    """e2fsck -fn: a full read-only check; an image that fails it is not reported good."""
    proc = subprocess.run(["e2fsck", "-fn", spec], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join(proc.stdout.strip().splitlines()[-3:])
        raise DiskError(f"the new file system does not check clean (e2fsck -fn exited {proc.returncode}): {tail}")


def debugfs_script(files: Mapping[str, tuple[Path, int]]) -> str:
    """debugfs commands that (re)write each file (root-owned, given mode) and its parents."""
    lines, made = [], set()
    for rel, (src, mode) in sorted(files.items()):
        parts = rel.strip("/").split("/")
        for i in range(1, len(parts)):
            d = "/" + "/".join(parts[:i])
            if d not in made:
                lines.append(f'mkdir "{d}"')  # an existing directory is an error debugfs ignores
                made.add(d)
        p = "/" + "/".join(parts)
        lines += [f'rm "{p}"', f'write "{src}" "{p}"', f'sif "{p}" mode 0{0o100000 | mode:o}',
                  f'sif "{p}" uid 0', f'sif "{p}" gid 0']
    return "\n".join(lines) + "\n"


def add_files(spec: str, files: Mapping[str, tuple[bytes, int]], scratch: Path) -> None:
    """Write ``files`` (path in the fs -> (content, mode)) into the file system, then read
    each back: debugfs reports command errors only as text, so the read-back is the check."""
    staged = {}
    for i, (rel, (data, mode)) in enumerate(files.items()):
        if any(c in rel for c in '"\n') or ".." in rel.split("/"):
            raise UsageError(f"internal: unsafe image path {rel!r}")
        src = scratch / f"add-{i}"
        src.write_bytes(data)
        staged[rel] = (src, mode)
    _run(["debugfs", "-w", "-f", "-", spec], "adding files to the image", input=debugfs_script(staged))
    for rel, (data, _mode) in files.items():
        got = subprocess.run(["debugfs", "-R", f'cat "/{rel.strip("/")}"', spec], capture_output=True)
        if got.stdout != data:
            raise DiskError(f"/{rel} did not read back from the image after writing it; the image is not usable")


def read_file(spec: str, rel: str) -> bytes:
    return subprocess.run(["debugfs", "-R", f'cat "/{rel.strip("/")}"', spec], capture_output=True).stdout


def discard(target: Target) -> str:
    """After a failure: never leave a half-written disk that looks like an image."""
    if target.kind == "file":
        try:
            os.unlink(target.path)
            return f"removed {target.path}"
        except OSError:
            return f"could not remove {target.path}"
    try:
        ok = subprocess.run(["wipefs", "-q", "-a", str(target.path)], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return (f"wiped the partition table of {target.path}" if ok else
            f"could NOT wipe {target.path}: run wipefs -a {target.path} before using it")
