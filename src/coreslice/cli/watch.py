"""``coreslice watch``: every few seconds, ask ``coreslice status --json`` how the slices are, and
restart those that crashed and asked for it (``--on-crash restart``).

Thin loop: the decision is watching.decide (pure, unit-tested); status and restart run as child
processes, so the watcher depends only on their JSON, and a crash in either leaves it running.
One line per state change and per action goes to stdout (the systemd journal, under
coreslice-watch.service), or one JSON object per line with --json-lines.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from coreslice import watching
from coreslice.cli.apply import COMMAND, child_args, where
from coreslice.cli.host import root_arg
from coreslice.cli.slices import LEDGER_HELP

STATUS_TIMEOUT = 120.0  # seconds: status reads each slice's log from its memory; a hung one is an error

WATCH_HELP = """\
Watch the slices of this host boot: every --interval seconds run `coreslice status --json`, log
each slice whose state changed, and run `coreslice restart NAME` for every slice that panicked
or halted and was booted with --on-crash restart (on-crash = "restart" in its declaration).  At
most --max-restarts restarts per slice in --restart-window minutes; after that the slice is left
as it is, the log says why, and the watcher restarts it again only once it was seen running
(restarted by hand).  SIGTERM or SIGINT stop the watcher after the command it is running.

`coreslice host install-units` runs this as coreslice-watch.service.
"""


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = 0.0
    if not 0 < v <= 86400:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive number (at most 86400); give e.g. 5")
    return v


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number >= 0; give e.g. 3")
    return n


class Watcher:
    def __init__(self, args, emit):
        self.extra = child_args(args)
        self.policy = watching.Policy(args.max_restarts, args.restart_window * 60)
        self.emit = emit
        self.seen: dict[str, watching.Seen] = {}
        self.status_error: str | None = None

    def status_argv(self) -> list[str]:
        return [*COMMAND, "status", *self.extra, "--json"]

    def restart_argv(self, name: str) -> list[str]:
        return [*COMMAND, "restart", name, *self.extra, "--json"]

    def status(self) -> list[dict] | None:
        """status's slices, or None (logged once per distinct error)."""
        error = None
        try:
            r = subprocess.run(self.status_argv(), capture_output=True, text=True, timeout=STATUS_TIMEOUT, cwd="/")
        except subprocess.TimeoutExpired:
            error = f"coreslice status gave no answer in {STATUS_TIMEOUT:g} s"
        else:
            doc = _json(r.stdout)
            if r.returncode == 0 and doc.get("ok") and isinstance(doc.get("slices"), list):
                if self.status_error is not None:
                    self.emit(watching.Event("status-ok", "coreslice status answers again"))
                    self.status_error = None
                return [s for s in doc["slices"] if isinstance(s, dict)]
            error = _error(doc, r, "coreslice status")
        if error != self.status_error:
            self.emit(watching.Event("status-failed", f"coreslice status failed: {error} (retrying every round)"))
            self.status_error = error
        return None

    def restart(self, name: str) -> bool:
        r = subprocess.run(self.restart_argv(name), capture_output=True, text=True, cwd="/")
        doc = _json(r.stdout)
        ok = r.returncode == 0 and bool(doc.get("ok"))
        detail = where(doc.get("slice")) if ok else _error(doc, r, "coreslice restart")
        self.emit(watching.restarted(name, ok, detail))
        return ok

    def round(self, stop: threading.Event) -> bool:
        """One look and what follows; False when something failed."""
        slices = self.status()
        if slices is None:
            return False
        step = watching.decide(self.seen, slices, time.time(), self.policy)
        self.seen = step.seen
        for e in step.events:
            self.emit(e)
        ok = True
        for name in step.restart:
            if stop.is_set():
                break
            ok = self.restart(name) and ok
        return ok


def _json(text: str) -> dict:
    try:
        doc = json.loads(text)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _error(doc: dict, r: subprocess.CompletedProcess, what: str) -> str:
    if isinstance(doc.get("error"), str) and doc["error"]:
        return doc["error"]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    return lines[-1].removeprefix("coreslice: error: ") if lines else f"{what} exited with {r.returncode}"


def cmd_watch(args) -> int:
    def emit(e: watching.Event) -> None:
        line = json.dumps(e.to_json(time.time())) if args.json_lines else e.message
        print(line, flush=True)

    stop = threading.Event()
    got: list[str] = []

    def on_signal(signum, _frame):
        got.append(signal.Signals(signum).name)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    watcher = Watcher(args, emit)
    try:
        if not args.once:
            emit(watching.Event("started", f"watching the slices every {args.interval:g} s (restarts: at most "
                                f"{watcher.policy.describe()} per slice)"))
        while True:
            ok = watcher.round(stop)
            if args.once:
                return 0 if ok else 1
            if stop.wait(args.interval):
                break
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    emit(watching.Event("stopped", f"stopped ({got[0] if got else 'asked to'})"))
    return 0


def register(sub) -> None:
    p = sub.add_parser("watch", help="restart slices that crashed (--on-crash restart), logging state changes",
                       description=WATCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="exit status: 0 stopped by a signal (or --once: every command worked), 1 --once and "
                              "status or a restart failed, 2 bad input")
    p.add_argument("--interval", type=_positive_float, default=5.0, metavar="S",
                   help="seconds between two looks (default 5)")
    p.add_argument("--once", action="store_true", help="look once, act, and exit")
    p.add_argument("--max-restarts", type=_count, default=3, metavar="N",
                   help="restarts of one slice allowed within --restart-window (default 3; 0: never restart)")
    p.add_argument("--restart-window", type=_positive_float, default=10.0, metavar="MIN",
                   help="minutes over which --max-restarts counts (default 10)")
    p.add_argument("--json-lines", action="store_true",
                   help='one JSON object per line: {"time", "time_iso", "event", "slice", "state", "message"}')
    p.add_argument("--ledger", type=Path, metavar="PATH", help=LEDGER_HELP + "; passed to status and restart")
    p.add_argument("--host-root", type=root_arg, default=Path("/"), metavar="DIR",
                   help="a captured host tree, passed to status and restart (tests only, with CORESLICE_FAKE_MACHINE=1)")
    p.set_defaults(func=cmd_watch, json=False)
