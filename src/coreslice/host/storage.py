"""Which PCI functions hold the host's own storage: the disks behind its mounted file systems and
its swap.  A slice must never be given one of them (it would reset the controller under the host).

/proc/mounts and /proc/swaps name block devices; /sys/class/block/<dev> links into the device
tree, whose path contains the PCI function(s) the disk hangs off (".../0000:00:17.0/nvme/...").
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
    link = root / "sys/class/block" / name
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


def host_storage_functions(root: Path) -> dict[str, list[str]]:
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
        name = _block_name(dev)
        if name is None and dev.startswith("/dev/mapper/"):
            real = os.path.realpath(root / dev.lstrip("/"))
            name = os.path.basename(real) if os.path.basename(real).startswith("dm-") else None
        if name is None:
            continue
        for addr in _pci_functions_of(root, name):
            out.setdefault(addr, [])
            if what not in out[addr]:
                out[addr].append(what)
    return out
