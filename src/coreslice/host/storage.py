"""Which PCI functions hold the host's own storage: the disks behind its mounted file systems and
its swap.  A slice must never be given one of them (it would reset the controller under the host).

/proc/mounts and /proc/swaps name block devices; /sys/class/block/<dev> links into the device
tree, whose path contains the PCI function(s) the disk hangs off (".../0000:00:17.0/nvme/...").

A root file system the kernel mounted itself (no initramfs) shows as "/dev/root", a name with no
sysfs entry: it is found through the mount's major:minor (/proc/self/mountinfo, or the st_dev of
/ on the live host) in /sys/dev/block, or through root= on the kernel command line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from coreslice.host.sysfs import read_text

_PCI_IN_PATH = re.compile(r"/([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])(?=/)")


def _block_name(dev: str) -> str | None:
    if not dev.startswith("/dev/"):
        return None
    name = dev[5:]
    if name.startswith("mapper/") or name.startswith("disk/"):
        return None  # device-mapper and by-id names: resolved through the dm-N node below
    return name.replace("/", "!")


def _pci_functions_of(root: Path, name: str) -> list[str]:
    """The PCI function a block device hangs off (the last one on its sysfs path: the ones before
    it are the bridges leading there), and for dm/md devices those of their slaves."""
    return _pci_functions_at(root, root / "sys/class/block" / name)


def _pci_functions_at(root: Path, link: Path) -> list[str]:
    try:
        target = os.readlink(link)
    except OSError:
        return []
    found = _PCI_IN_PATH.findall(target + "/")[-1:]
    slaves = link / "slaves"
    if slaves.is_dir():
        for s in slaves.iterdir():
            found += _pci_functions_of(root, s.name)
    return found


def _mountinfo_dev(root: Path, mount_point: str) -> str | None:
    """MAJ:MIN of the file system mounted at ``mount_point`` (the last such mount wins, as it
    hides the others), from /proc/self/mountinfo (proc(5): field 3 MAJ:MIN, field 5 the mount point)."""
    dev = None
    for line in (read_text(root, "proc/self/mountinfo", "") or "").splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[4] == mount_point and re.fullmatch(r"\d+:\d+", fields[2]):
            dev = fields[2]
    return dev


def _cmdline_root(root: Path) -> Path | None:
    """The sysfs link of the block device named by root= on the kernel command line: /dev/NAME,
    MAJ:MIN, the old hexadecimal form (e.g. 801) or a /dev/disk/by-* / PARTUUID= name resolved
    through the udev links under /dev."""
    value = None
    for word in (read_text(root, "proc/cmdline", "") or "").split():
        if word.startswith("root="):
            value = word[5:]  # the last root= wins, as for the kernel
    if not value:
        return None
    for key, folder in (("PARTUUID=", "by-partuuid"), ("UUID=", "by-uuid"), ("LABEL=", "by-label")):
        if value.startswith(key):
            value = f"/dev/disk/{folder}/{value[len(key):].split('/')[0]}"
    if value.startswith("/dev/"):
        real = os.path.realpath(root / value.lstrip("/"))  # by-* names are links to ../../sdXN
        return root / "sys/class/block" / (os.path.basename(real) if "/disk/" in value else value[5:].replace("/", "!"))
    if re.fullmatch(r"\d+:\d+", value):
        return root / "sys/dev/block" / value
    if re.fullmatch(r"[0-9a-fA-F]{3,4}", value):  # old_decode_dev: major << 8 | minor
        n = int(value, 16)
        return root / "sys/dev/block" / f"{n >> 8}:{n & 0xFF}"
    return None


def dev_root_functions(root: Path, live: bool | None = None) -> list[str]:
    """PCI functions behind "/dev/root": the mount's MAJ:MIN, else root= of the command line,
    else (live host only) the st_dev of /."""
    live = Path(root) == Path("/") if live is None else live
    dev = _mountinfo_dev(root, "/")
    if dev is not None and not dev.startswith("0:"):  # 0:N is an anonymous device (btrfs, overlay)
        found = _pci_functions_at(root, root / "sys/dev/block" / dev)
        if found:
            return found
    link = _cmdline_root(root)
    found = _pci_functions_at(root, link) if link is not None else []
    if not found and live:
        st = os.stat(root).st_dev
        found = _pci_functions_at(root, root / f"sys/dev/block/{os.major(st)}:{os.minor(st)}")
    return found


def host_storage_functions(root: Path, live: bool | None = None) -> dict[str, list[str]]:
    """PCI address -> what of the host's lives behind it (mount points, "swap")."""
    uses: list[tuple[str, str]] = []
    for line in (read_text(root, "proc/mounts", "") or "").splitlines():
        fields = line.split()
        if len(fields) >= 2:
            uses.append((fields[0], fields[1].replace("\\040", " ")))
    for line in (read_text(root, "proc/swaps", "") or "").splitlines()[1:]:
        fields = line.split()
        if fields:
            uses.append((fields[0], "swap"))
    out: dict[str, list[str]] = {}
    for dev, what in uses:
        if dev == "/dev/root":
            addrs = dev_root_functions(root, live)
        else:
            name = _block_name(dev)
            if name is None and dev.startswith("/dev/mapper/"):
                real = os.path.realpath(root / dev.lstrip("/"))
                name = os.path.basename(real) if os.path.basename(real).startswith("dm-") else None
            addrs = _pci_functions_of(root, name) if name is not None else []
        for addr in addrs:
            out.setdefault(addr, [])
            if what not in out[addr]:
                out[addr].append(what)
    return out
