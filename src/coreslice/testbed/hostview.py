"""What of the build machine the emulated host sees, and at which paths.

The emulated host's root is this machine's ``/``, shared read-only over 9p (DESIGN.md section
3); its init then mounts proc, sysfs and devtmpfs, and a tmpfs on ``/tmp`` and ``/run``, so
anything below those is not this machine's there.  A clone under ``/tmp`` -- the most common
place to try a project -- would be invisible, and so would a virtual environment inside it.

So every directory the job needs is exported as a 9p share of its own and mounted inside the
chroot at the same path (its mount point is created on the tmpfs when needed): the run
directory (read-write), the coreslice source tree, the virtual environment that runs it, and
the directories of the slice kernels and initramfs images.  Paths are then the same inside and
outside wherever they live.  Only ``/proc``, ``/sys`` and ``/dev`` cannot hold a share.

The interpreter is the virtual environment's own ``bin/python`` (not the base interpreter it
links to: Python finds ``pyvenv.cfg``, and so the venv's packages, from the unresolved path).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import coreslice
from coreslice.errors import UsageError

# Mounted over by the host init; a share may sit below the tmpfs ones, not below these.
TMPFS = ("/tmp", "/run")
UNSHAREABLE = ("/proc", "/sys", "/dev")


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


@dataclass(frozen=True)
class HostPython:
    interpreter: str  # what the job runs: the venv's bin/python, or the real interpreter
    pythonpath: str  # the directory holding the ``coreslice`` package
    shares: tuple[Path, ...]  # directories it needs, besides the shared root


def source_root() -> Path:
    """The project tree holding this coreslice (with pyproject.toml), else the directory that
    holds the ``coreslice`` package (an installed copy)."""
    pkg_parent = Path(coreslice.__file__).resolve().parents[1]
    project = pkg_parent.parent
    return project if (project / "pyproject.toml").is_file() else pkg_parent


def host_python() -> HostPython:
    pythonpath = str(Path(coreslice.__file__).resolve().parents[1])
    shares = [source_root()]
    if sys.prefix != sys.base_prefix:  # a virtual environment: run its python, share it
        interpreter = str(Path(sys.prefix) / "bin" / "python")
        if not os.path.exists(interpreter):
            interpreter = sys.executable
        shares.append(Path(sys.prefix).resolve())
    else:
        interpreter = os.path.realpath(sys.executable)
    base = os.path.realpath(sys.base_prefix)
    if any(_under(base, top) for top in TMPFS):  # e.g. a Python built under /tmp
        shares.append(Path(base))
    return HostPython(interpreter, pythonpath, tuple(shares))


def mount_points(dirs: Iterable[Path]) -> list[Path]:
    """The directories to share, each once: resolved, those inside another dropped, parents
    first (so a later mount may sit inside an earlier one's tree).  A directory that cannot be
    shared is refused with the reason."""
    resolved = sorted({Path(d).resolve() for d in dirs}, key=lambda p: (len(p.parts), str(p)))
    out: list[Path] = []
    for p in resolved:
        s = str(p)
        for top in UNSHAREABLE:
            if _under(s, top):
                raise UsageError(f"{s} is under {top}, which the emulated host mounts over; "
                                 "use a location outside /proc, /sys and /dev")
        if s == "/" or any(_under(s, str(q)) for q in out):
            continue
        out.append(p)
    return out


def render_mounts(points: Iterable[Path], tag_prefix: str = "share") -> tuple[list[tuple[str, Path]], str]:
    """(tag, path) per share and the ``mounts`` file the host init reads: one ``TAG PATH``
    line per share, in mount order."""
    pairs = [(f"{tag_prefix}{i}", p) for i, p in enumerate(points)]
    return pairs, "".join(f"{tag} {p}\n" for tag, p in pairs)
