"""The boot loader configuration: a GRUB drop-in and update-grub (host configure's effects)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Protocol

from coreslice.errors import CoresliceError, UsageError

DROPIN = "etc/default/grub.d/coreslice.cfg"


class Grub(Protocol):
    def write_dropin(self, text: str) -> Path: ...
    def update(self) -> str: ...


def check_dropin(root: Path) -> Path:
    """The drop-in's path under ``root``; UsageError, before anything is written, when it cannot
    be written there: etc/default/grub.d is no directory, or the drop-in is no regular file."""
    path = Path(root) / DROPIN
    for d in (path.parent.parent, path.parent):
        if (d.exists() or d.is_symlink()) and not d.is_dir():
            raise UsageError(f"{d} is not a directory, so the drop-in {path} cannot be written; move {d} "
                             "aside (GRUB reads drop-ins from the directory etc/default/grub.d)")
    if (path.exists() or path.is_symlink()) and not path.is_file():
        raise UsageError(f"{path} exists and is not a regular file; remove it (coreslice writes its "
                         "drop-in there), then run again")
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory (a reader sees
    the old file or the new one, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".coreslice-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RealGrub:
    def __init__(self, root: Path = Path("/")):
        self.root = Path(root)

    def write_dropin(self, text: str) -> Path:
        path = check_dropin(self.root)
        try:
            write_atomic(path, text)
        except PermissionError:
            raise CoresliceError(f"cannot write {path}: permission denied; run as root") from None
        except OSError as e:
            raise CoresliceError(f"cannot write {path}: {e.strerror}; fix that path, then run again") from None
        return path

    def update(self) -> str:
        exe = shutil.which("update-grub")
        if exe is None:
            raise CoresliceError("update-grub not found: install grub2-common (Debian, Ubuntu) or run "
                                 "grub-mkconfig -o /boot/grub/grub.cfg yourself; the drop-in is written")
        print(f"$ {exe}", file=sys.stderr, flush=True)
        r = subprocess.run([exe], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            last = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
            raise CoresliceError(f"update-grub exited with {r.returncode} ({last[0]}); fix that, "
                                 "then run update-grub again (the drop-in is written)")
        return (r.stdout + r.stderr).strip()
