"""systemd units that start the declared slices at host boot and watch them afterwards
(``coreslice host install-units``).  Not to be confused with coreslice/units.py (sizes).

- ``coreslice-apply.service``: oneshot, at every host boot once local file systems are mounted
  and modules-load.d has run, loads the msr driver (boot plans x2APIC hosts through
  /dev/cpu/0/msr) and runs ``coreslice apply``: every slice of /etc/coreslice/slices/*.toml
  that the new host boot does not run yet is booted.
- ``coreslice-watch.service``: after it, ``coreslice watch``, which restarts slices that crashed
  and asked for it.  KillMode=mixed: a stop sends SIGTERM to the watcher alone, which lets a
  ``coreslice restart`` it is running finish (a boot killed half-way leaves CPUs to recover).

ExecStart names the coreslice that installs them (this interpreter, ``-m coreslice``), so a
venv's coreslice runs with its own packages; :func:`units` is pure, :func:`install` writes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from coreslice.errors import CoresliceError, UsageError

DEFAULT_DEST = Path("/etc/systemd/system")
APPLY = "coreslice-apply.service"
WATCH = "coreslice-watch.service"
_PLAIN = re.compile(r"^[A-Za-z0-9/._+:@=,-]+$")


def entry_point() -> list[str]:
    """How this coreslice runs: the interpreter's own path (not its realpath: a venv's python
    is a link, and only through it does Python find the venv) and ``-m coreslice``."""
    return [os.path.abspath(sys.executable), "-m", "coreslice"]


def modprobe() -> str:
    return shutil.which("modprobe", path="/usr/sbin:/sbin:/usr/bin:/bin") or "/sbin/modprobe"


def quote(arg: str) -> str:
    """One word of a systemd command line (systemd.service(5), "Command lines"): specifiers
    (%) and variables ($) doubled, double quotes around anything but plain characters."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if _PLAIN.match(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def command_line(argv: Sequence[str]) -> str:
    return " ".join(quote(a) for a in argv)


def units(coreslice: Sequence[str] | None = None, modprobe_path: str | None = None) -> dict[str, str]:
    """File name -> text of the two units, running ``coreslice`` (default: :func:`entry_point`)."""
    cs = list(coreslice or entry_point())
    mp = modprobe_path or modprobe()
    apply = f"""\
# Written by coreslice host install-units: start the slices declared in /etc/coreslice/slices.
[Unit]
Description=coreslice: start the declared slices (coreslice apply)
After=local-fs.target systemd-modules-load.service
Before={WATCH}

[Service]
Type=oneshot
RemainAfterExit=yes
# coreslice boot reads IA32_APIC_BASE through /dev/cpu/0/msr; '-': a kernel with the msr driver
# built in, or an xAPIC host without it, boots anyway (boot itself says what is missing).
ExecStartPre=-{quote(mp)} msr
ExecStart={command_line([*cs, "apply"])}
# Booting large slices scrubs their memory first: no start timeout.
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
"""
    watch = f"""\
# Written by coreslice host install-units: restart slices that crashed (boot --on-crash restart).
[Unit]
Description=coreslice: restart crashed slices (coreslice watch)
After={APPLY}

[Service]
Type=simple
ExecStart={command_line([*cs, "watch"])}
Restart=on-failure
RestartSec=5
# SIGTERM to the watcher only: it lets a restart it runs finish, then exits.
KillMode=mixed
Environment=PYTHONUNBUFFERED=1

[Install]
WantedBy=multi-user.target
"""
    return {APPLY: apply, WATCH: watch}


Runner = Callable[[list[str]], subprocess.CompletedProcess]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise CoresliceError(f"{argv[0]} not found: this host has no systemd; the units are written, "
                             "start coreslice apply and coreslice watch another way") from None


@dataclass
class Installed:
    dest: Path
    files: dict[str, str]                       # path -> text
    written: bool
    commands: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"ok": True, "dest": str(self.dest), "written": self.written,
                "files": [{"path": p, "content": t} for p, t in self.files.items()], "commands": self.commands}


def install(dest: Path = DEFAULT_DEST, *, dry_run: bool = False, run: Runner = _run,
            text: dict[str, str] | None = None) -> Installed:
    """Write the units into ``dest``; into the system's own directory, also daemon-reload and
    enable them (not start: ``coreslice apply`` runs at the next host boot, or by hand)."""
    text = text or units()
    files = {str(dest / name): t for name, t in text.items()}
    out = Installed(dest, files, written=False)
    if dry_run:
        return out
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for path, t in files.items():
            tmp = Path(path + ".tmp")
            tmp.write_text(t)
            tmp.chmod(0o644)
            tmp.replace(path)
    except OSError as e:
        fix = "run it as root (sudo)" if isinstance(e, PermissionError) else "choose another --dest"
        raise UsageError(f"cannot write the units into {dest}: {e.strerror}; {fix}") from None
    out.written = True
    if dest.resolve() != DEFAULT_DEST:
        return out
    for argv in (["systemctl", "daemon-reload"], ["systemctl", "enable", *text]):
        r = run(argv)
        out.commands.append({"argv": argv, "returncode": r.returncode, "stderr": (r.stderr or "").strip()})
        if r.returncode != 0:
            last = (r.stderr or r.stdout or "").strip().splitlines()[-1:] or [f"exit status {r.returncode}"]
            raise CoresliceError(f"{' '.join(argv)} failed ({last[0]}); the units are written in {dest}: "
                                 f"fix that, then run {' '.join(argv)}")
    return out
