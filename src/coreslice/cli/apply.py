"""``coreslice apply``: boot the declared slices (declared.py) that this host boot does not run yet.

Thin: declared.py reads and checks the declarations and compares them with the ledger; each
slice is started by a child ``coreslice boot ... --json``, exactly as a person would start it,
so that one slice's failure (or a crash of its launch) leaves the others to be started.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from coreslice import declared
from coreslice.cli.host import root_arg
from coreslice.cli.slices import LEDGER_HELP
from coreslice.host.sysfs import format_cpu_list
from coreslice.units import format_size

# How a child coreslice is run: this interpreter, so a venv's coreslice runs its own children.
COMMAND = [sys.executable, "-m", "coreslice"]

APPLY_HELP = f"""\
Start the slices declared in {declared.DEFAULT_DIR}/NAME.toml (or --slices-dir DIR, or
${declared.ENV}) that this host boot does not hold yet, one `coreslice boot` each, in the
order of their file names.  A declared slice the ledger already holds is left alone, and what
its declaration now says differently from what it was started with is reported as drift.
Slices of the ledger that no file declares are listed and left alone too.

A declaration holds the long options of `coreslice boot` as TOML keys ('-' or '_'); the
slice's name is the file's name; relative paths are taken from the file's directory:

    # {declared.DEFAULT_DIR}/web.toml
    kernel = "/boot/vmlinuz-6.12.0"
    initrd = "/boot/initrd.img-6.12.0"
    ncpus = 2
    memory = "1G"
    console = "io:0x2f8"
    device = ["0000:01:00.0"]
    on-crash = "restart"

`coreslice host install-units` runs this at every host boot (coreslice-apply.service).
"""


@dataclass
class Outcome:
    name: str
    action: str                 # started | unchanged | drift | failed | would-start | not-declared
    drift: list[str] = field(default_factory=list)
    error: str | None = None
    note: str | None = None
    state: str | None = None    # the ledger's state of a held slice
    source: Path | None = None
    argv: list[str] | None = None
    slice: dict | None = None   # boot's ledger row of a started slice

    def to_json(self) -> dict:
        return {"name": self.name, "action": self.action, "drift": self.drift, "error": self.error,
                "note": self.note, "state": self.state, "file": str(self.source) if self.source else None,
                "argv": self.argv, "slice": self.slice}

    def line(self) -> str:
        if self.action == "started":
            at = where(self.slice)
            return f"{self.name}: started" + (f": {at}" if at else "")
        if self.action == "would-start":
            return f"{self.name}: would start: coreslice {' '.join(_quoted(self.argv or []))}"
        if self.action == "failed":
            return f"{self.name}: failed: {self.error}"
        if self.action == "not-declared":
            return f"{self.name}: not declared ({self.state}; left alone)"
        held = "running" if self.state == "running" else f"held ({self.state})"
        if self.action == "drift":
            return (f"{self.name}: drift: {'; '.join(self.drift)} ({held}, left as it is; to apply the declaration: "
                    f"coreslice stop {self.name}, then coreslice apply)")
        if self.note:
            return f"{self.name}: {held}; {self.note}"
        return f"{self.name}: {held} as declared"


def where(s) -> str | None:
    """'CPUs 1-2, 1G@0x40000000' from a ledger row's JSON (boot's or restart's "slice")."""
    if not isinstance(s, dict):
        return None
    mem = s.get("memory") or {}
    try:
        return (f"CPUs {format_cpu_list(sorted(int(c) for c in s.get('cpus') or []))}, "
                f"{format_size(int(mem['size']))}@0x{int(mem['base']):x}")
    except (KeyError, TypeError, ValueError):
        return None


def _quoted(argv: list[str]) -> list[str]:
    import shlex

    return [shlex.quote(a) for a in argv]


def child_args(args) -> list[str]:
    """What this apply was told about the ledger and the host, passed on to each boot."""
    out = []  # absolute: the children run in /
    if args.ledger is not None:
        out += ["--ledger", str(args.ledger.absolute())]
    if args.host_root.resolve() != Path("/"):
        out += ["--host-root", str(args.host_root.absolute())]
    return out


def start(decl: declared.Declaration, extra: list[str]) -> Outcome:
    """`coreslice boot` for ``decl`` as a child process; its JSON says how it went."""
    argv = [*decl.boot_argv(), *extra, "--json"]
    # cwd /: what systemd gives; the declaration's paths are absolute already.
    r = subprocess.run([*COMMAND, *argv], capture_output=True, text=True, cwd="/")
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        doc = None
    if r.returncode == 0 and isinstance(doc, dict) and doc.get("ok"):
        return Outcome(decl.name, "started", source=decl.source, argv=argv, slice=doc.get("slice"))
    error = doc.get("error") if isinstance(doc, dict) else None
    if not error:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        error = lines[-1].removeprefix("coreslice: error: ") if lines else f"coreslice boot exited with {r.returncode}"
    return Outcome(decl.name, "failed", error=error, source=decl.source, argv=argv)


def apply(decls: list, held: list, *, cpu_nodes: dict | None, dry_run: bool, extra: list[str]) -> list[Outcome]:
    by_name = {r.name: r for r in held}  # oldest first: the newest row of a name wins
    out = []
    for d in decls:
        if isinstance(d, declared.Invalid):
            out.append(Outcome(d.name, "failed", error=d.error, source=d.source))
            continue
        rec = by_name.get(d.name)
        if rec is None:
            out.append(Outcome(d.name, "would-start", source=d.source, argv=[*d.boot_argv(), *extra])
                       if dry_run else start(d, extra))
            continue
        drift, note = declared.compare(d, rec, cpu_nodes)
        out.append(Outcome(d.name, "drift" if drift else "unchanged", drift=drift, note=note, state=rec.state,
                           source=d.source))
    names = {d.name for d in decls}
    out += [Outcome(r.name, "not-declared", state=r.state) for r in held if r.name not in names]
    return out


def cmd_apply(args) -> int:
    from coreslice.host.snapshot import discover
    from coreslice.launch.session import open_ledger

    directory = declared.slices_dir(args.slices_dir)
    explicit = args.slices_dir is not None or bool(os.environ.get(declared.ENV))
    decls = declared.load_dir(directory, must_exist=explicit)
    host = discover(args.host_root)
    ledger = open_ledger(args.ledger, host, readonly=True)
    cpu_nodes = {c.cpu: c.node for c in host.cpus}
    outcomes = apply(decls, ledger.holding(), cpu_nodes=cpu_nodes, dry_run=args.dry_run, extra=child_args(args))
    ok = not any(o.action == "failed" for o in outcomes)
    if args.json:
        print(json.dumps({"ok": ok, "slices_dir": str(directory), "ledger": str(ledger.path),
                          "dry_run": args.dry_run, "slices": [o.to_json() for o in outcomes]}, indent=2))
    else:
        if not decls:
            print(f"no slices declared in {directory}")
        for o in outcomes:
            print(o.line())
    return 0 if ok else 1


def register(sub) -> None:
    p = sub.add_parser("apply", help="start the declared slices (/etc/coreslice/slices/*.toml) not running yet",
                       description=APPLY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="exit status: 0 every declared slice runs (or would start), 1 one failed or is "
                              "declared wrongly, 2 bad input")
    p.add_argument("--slices-dir", type=Path, metavar="DIR",
                   help=f"the directory of NAME.toml declarations (default: ${declared.ENV}, else "
                        f"{declared.DEFAULT_DIR})")
    p.add_argument("--dry-run", action="store_true",
                   help="start nothing: print the coreslice boot each slice would get, and the drift of the others")
    p.add_argument("--ledger", type=Path, metavar="PATH", help=LEDGER_HELP)
    p.add_argument("--host-root", type=root_arg, default=Path("/"), metavar="DIR",
                   help="a captured host tree, passed to each boot (tests only, with CORESLICE_FAKE_MACHINE=1)")
    p.add_argument("--json", action="store_true",
                   help='print {"ok", "slices": [{"name", "action", "drift", "error", ...}]}')
    p.set_defaults(func=cmd_apply)
