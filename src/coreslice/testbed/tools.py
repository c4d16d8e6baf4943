"""Progress messages and the one helper through which every external tool is run.

Progress goes to stderr (the testbed's slow steps take seconds to minutes under TCG, so it
says what it is doing); ``set_quiet(True)`` silences it.  Every external command line is
logged before it runs, so a failure can be reproduced by hand.
"""

from __future__ import annotations

from pathlib import Path

import shlex
import subprocess
import sys
import time
from collections.abc import Sequence

from coreslice.errors import CoresliceError

_quiet = False
_t0 = time.monotonic()


class ToolError(CoresliceError):
    """An external tool (apt-get, dpkg, depmod, QEMU, ...) failed."""

    exit_code = 1


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def progress(message: str) -> None:
    """One progress line on stderr, prefixed with the seconds since the process started."""
    if not _quiet:
        print(f"[testbed {time.monotonic() - _t0:6.1f}s] {message}", file=sys.stderr, flush=True)


def format_command(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in argv)


def run_tool(
    argv: Sequence[str], *, cwd: str | None = None, capture: bool = True, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run one external command, logging its command line; raise ToolError naming it on failure."""
    progress(f"$ {format_command(argv)}")
    try:
        proc = subprocess.run(
            [str(a) for a in argv],
            cwd=cwd,
            text=True,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise ToolError(
            f"{argv[0]}: not found; install the system packages with scripts/install-system-deps.sh"
        ) from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        raise ToolError(
            f"{format_command(argv)} exited with {proc.returncode}: " + " | ".join(detail)
        )
    return proc


def read_or_none(path: Path) -> str | None:
    """A run-dir file's text, or None when the job did not write it."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None
