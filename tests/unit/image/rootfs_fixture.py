"""A small synthetic root tarball for image tests (unit and end to end)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

REL = "6.12.0-test-amd64"


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", **kw) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = kw.pop("mode", 0o644)
    for k, v in kw.items():
        setattr(ti, k, v)
    tar.addfile(ti, io.BytesIO(data) if data else None)


def make_root(path: Path, *, kernel: bool = True, nvme: bool = True, compress: str = "") -> Path:
    """A small root tree: init, a kernel with initrd and modules, a setuid file owned by
    1000:1000 with a file capability, a device node, a symlink."""
    with tarfile.open(path, "w:" + compress, format=tarfile.PAX_FORMAT) as tar:
        for d in ("./", "./etc", "./sbin", "./boot", "./dev", "./usr", "./usr/bin", "./home", "./home/u"):
            _add(tar, d, type=tarfile.DIRTYPE, mode=0o755)
        _add(tar, "./etc/fstab", b"# UNCONFIGURED FSTAB\n")
        _add(tar, "./sbin/init", b"#!/bin/sh\n", mode=0o755)
        _add(tar, "./usr/bin/cloud-init", b"#!/bin/sh\n", mode=0o755)
        _add(tar, "./home/u/suid", b"x", mode=0o4755, uid=1000, gid=1000, uname="u", gname="u",
             pax_headers={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20" + "\x00" * 14})
        _add(tar, "./dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
        _add(tar, "./vmlinuz", type=tarfile.SYMTYPE, linkname=f"boot/vmlinuz-{REL}")
        if kernel:
            _add(tar, f"./boot/vmlinuz-{REL}", b"KERNEL" * 100)
            _add(tar, f"./boot/initrd.img-{REL}", b"INITRD" * 100)
            mods = f"./lib/modules/{REL}/kernel/drivers/"
            leaf = "nvme/host" if nvme else "net"
            for d in ("./lib", "./lib/modules", f"./lib/modules/{REL}", f"./lib/modules/{REL}/kernel", mods[:-1],
                      mods + leaf.split("/")[0], mods + leaf):
                _add(tar, d, type=tarfile.DIRTYPE, mode=0o755)
            _add(tar, mods + leaf + ("/nvme.ko.xz" if nvme else "/e1000e.ko.xz"), b"\0" * 64)
    return path
