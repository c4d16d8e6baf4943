"""``coreslice console`` and ``coreslice status``: a slice kernel's log and state, read from its
RAM on the host (slicelog/), without a UART.  The slice's memory is only read; the one file
written is the note-address hint next to the ledger (_hint_file).

Thin: the ledger says where a slice's RAM is, slicelog/ reads the log, slicelog/state.py
decides the state.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path

from coreslice.boot import efi
from coreslice.cli.host import root_arg
from coreslice.cli.slices import LEDGER_HELP
from coreslice.errors import CoresliceError, UsageError
from coreslice.host.snapshot import discover
from coreslice.launch.session import open_ledger
from coreslice.ledger import SliceRecord
from coreslice.machine import FAKE_MACHINE_ENV, for_host as machine_for
from coreslice.slicelog import LogUnreadable, Record, SliceLog
from coreslice.slicelog.state import decide

POLL = 0.5            # seconds between reads of the ring with --follow / --wait
_sleep = time.sleep   # tests replace it
_now = time.time


class WaitTimeout(CoresliceError):
    """--wait saw no matching record in time (exit 1)."""


def _context(args, verb: str):
    """(host, ledger, machine) for a command that reads slice RAM: the live host as root, or a
    captured tree with the in-memory machine (tests)."""
    live = args.host_root.resolve() == Path("/")
    if not live and os.environ.get(FAKE_MACHINE_ENV) != "1":
        raise UsageError(f"--host-root describes another machine; {verb} reads the live host's memory only: "
                         "drop --host-root")
    if live and os.geteuid() != 0:
        raise UsageError(f"coreslice {verb} must run as root (it reads the slice's RAM through /dev/mem); use sudo")
    host = discover(args.host_root)
    ledger = open_ledger(args.ledger, host, readonly=True)
    machine = machine_for(live, args.host_root)
    assert machine is not None
    return host, ledger, machine


def _held(ledger, name: str) -> SliceRecord:
    for r in ledger.holding():
        if r.name == name:
            return r
    raise UsageError(f"no slice named '{name}' holds resources in this host boot, so there is no log to read; "
                     "see coreslice list (a stopped slice's RAM is scrubbed)")


# Where a slice kernel's VMCOREINFO note was found, per launch (ledger row), next to the ledger:
# finding it scans the slice's whole RAM, which every status (the watcher runs one every few
# seconds) would otherwise repeat.  A stale or wrong hint costs nothing: find() checks the note
# is still at the hinted address and scans otherwise.
def _hint_file(ledger, row: SliceRecord) -> Path:
    return ledger.path.parent / "vmcoreinfo" / f"{row.boot_id}-{row.id}"


def _open_log(ledger, row: SliceRecord, read) -> SliceLog:
    hint = None
    with contextlib.suppress(OSError, ValueError):
        hint = int(_hint_file(ledger, row).read_text(), 16)
    return SliceLog(read, row.mem_base, row.mem_size, hint)


def _keep_hint(ledger, row: SliceRecord, log: SliceLog, before: int | None) -> None:
    if log.hint is None or log.hint == before:
        return
    with contextlib.suppress(OSError):  # e.g. a read-only ledger directory: the next call scans again
        path = _hint_file(ledger, row)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}")
        tmp.write_text(f"{log.hint:x}\n")
        os.replace(tmp, path)


# -- coreslice console ----------------------------------------------------------------------------

def _emit(rec: Record, json_lines: bool) -> None:
    if json_lines:
        print(json.dumps(rec.to_json()), flush=True)
    else:
        print("\n".join(rec.lines()), flush=True)


def _cmd_console(args) -> int:
    try:
        pattern = re.compile(args.wait) if args.wait is not None else None
    except re.error as e:
        raise UsageError(f"--wait {args.wait!r} is not a regular expression ({e}); e.g. --wait 'Run /init'") from None
    _host, ledger, machine = _context(args, "console")
    row = _held(ledger, args.name)
    log = _open_log(ledger, row, machine.mem.read)
    hint0 = log.hint
    try:
        return _console(args, pattern, ledger, row, log)
    finally:
        _keep_hint(ledger, row, log, hint0)


def _console(args, pattern, ledger, row: SliceRecord, log: SliceLog) -> int:
    if args.wait is None and not args.follow:
        records = log.records()
        if args.json:
            print(json.dumps({"ok": True, "slice": row.name, "kernel_release": log.info()["osrelease"],
                              "records": [r.to_json() for r in records]}, indent=2))
        else:
            for r in records:
                _emit(r, False)
        return 0
    deadline = time.monotonic() + args.timeout if pattern is not None else None
    since, generation, why = 0, 0, None
    seen: list[Record] = []
    while True:
        try:
            records = log.records(since)
            if log.generation != generation:
                if generation:  # a new kernel in the same RAM (relaunch): its seq starts again at 0
                    since, records = 0, log.records(0)
                generation = log.generation
            why = None
        except LogUnreadable as e:
            records, why = [], str(e)
            if not any(r.id == row.id for r in ledger.holding()):
                print(f"coreslice: slice '{row.name}' no longer holds its resources (stopped?)", file=sys.stderr)
                return 0 if pattern is None else _timeout(args, why)
        for r in records:
            since = r.seq + 1
            if not args.json or pattern is None:
                _emit(r, args.json)
            seen.append(r)
            if pattern is not None and any(pattern.search(t) for t in r.text.split("\n")):
                if args.json:
                    print(json.dumps({"ok": True, "slice": row.name, "kernel_release": log.info()["osrelease"],
                                      "matched": r.to_json(), "records": [x.to_json() for x in seen]}, indent=2))
                return 0
        if deadline is not None and time.monotonic() >= deadline:
            return _timeout(args, why)
        _sleep(POLL)


def _timeout(args, why: str | None) -> int:
    tail = f" (its log is unreadable: {why})" if why else ""
    raise WaitTimeout(f"no record of slice '{args.name}' matched --wait {args.wait!r} within {args.timeout:g} s{tail}; "
                      f"see coreslice console {args.name} for what it logged, or raise --timeout")


# -- coreslice status -----------------------------------------------------------------------------

def _latest(ledger, host, name: str) -> SliceRecord:
    """The newest row of ``name``, this host boot's first."""
    rows = [r for r in ledger.slices(history=True) if r.name == name]
    if not rows:
        raise UsageError(f"no slice named '{name}' in the ledger {ledger.path}; see coreslice list --all")
    this_boot = [r for r in rows if r.boot_id == host.boot_id]
    return max(this_boot or rows, key=lambda r: r.id or 0)


def _efi_reset(row: SliceRecord, read) -> str | None:
    """The ResetType of the slice's EFI ResetSystem call (boot/efi.py status record), or None:
    not called, no EFI stubs recorded (an older ledger row), or unreadable."""
    if row.efi_status is None:
        return None
    try:
        st = efi.read_status(read(row.efi_status, efi.STATUS_SIZE))
    except (OSError, CoresliceError):
        return None
    return st.reset_type if st is not None and st.reset_calls else None


def status_of(row: SliceRecord, boot_id: str, read, ledger=None) -> dict:
    """One slice's status document (the JSON contract of `coreslice status --json`)."""
    release = last = None
    texts = unreadable = None
    if row.boot_id != boot_id:
        state, reason = "stopped", "a slice of an earlier host boot"
    else:
        if row.state == "running":
            try:
                log = _open_log(ledger, row, read) if ledger is not None else SliceLog(read, row.mem_base, row.mem_size)
                hint0 = log.hint
                release = log.info()["osrelease"]
                if ledger is not None:
                    _keep_hint(ledger, row, log, hint0)
                records = log.records()
                texts = [r.text for r in records]
                last = records[-1].text.split("\n")[-1] if records else None
            except LogUnreadable as e:
                unreadable = str(e)
        efi_reset = _efi_reset(row, read) if row.state == "running" else None
        state, reason = decide(row.state, texts, unreadable, row.error, efi_reset)
    running_at = row.times.get("running_at")
    live = row.boot_id == boot_id and row.state == "running"
    return {
        "name": row.name, "state": state, "reason": reason,
        "uptime_s": round(_now() - running_at, 3) if live and running_at else None,
        "kernel_release": release, "last_log": last, "cpus": list(row.cpus),
        "memory": {"base": row.mem_base, "size": row.mem_size}, "on_crash": getattr(row, "on_crash", None),
        "dma": dma_status(row.name) if live else None,
    }


def dma_status(name: str) -> dict | None:
    """The slice's IOMMU domain (launch/dmahold.py); None when it has none (no IOMMU, no functions)."""
    from coreslice.launch.dmahold import holder_alive, read_state

    st = read_state(name)
    if st is None:
        return None
    alive = bool(st.get("ready")) and holder_alive(st)
    return {"confined": alive, "holder_pid": st.get("pid"), "functions": st.get("functions", []),
            "problem": None if alive else "its DMA holder is gone: its functions' DMA now faults (safe, but its "
                                          f"devices stop working); coreslice restart {name}"}


def _uptime(s: float | None) -> str:
    if s is None:
        return "-"
    m, sec = divmod(int(s), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


def _cmd_status(args) -> int:
    host, ledger, machine = _context(args, "status")
    rows = [_latest(ledger, host, args.name)] if args.name else ledger.holding()
    docs = [status_of(r, host.boot_id, machine.mem.read, ledger) for r in rows]
    if args.json:
        print(json.dumps({"ok": True, "ledger": str(ledger.path), "slices": docs}, indent=2))
        return 0
    if not docs:
        print("no slices in this host boot")
        return 0
    head = ("NAME", "STATE", "UPTIME", "KERNEL", "LAST LOG")
    table = [head] + [(d["name"], d["state"] + (f" ({d['reason']})" if d["reason"] and d["state"] != "unknown" else ""),
                       _uptime(d["uptime_s"]), d["kernel_release"] or "-", (d["last_log"] or "-")[:60]) for d in docs]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for d in docs:
        if d["state"] == "unknown":
            print(f"{d['name']}: state unknown: {d['reason']}")
        if d.get("dma") and d["dma"]["problem"]:
            print(f"{d['name']}: {d['dma']['problem']}")
    return 0


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1
    if not v > 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds > 0; give e.g. 120")
    return v


def register(sub) -> None:
    p = sub.add_parser("console", help="a slice kernel's log, read from its RAM (no UART needed)",
                       description="Print the kernel log of a slice, one line per record like dmesg, read from "
                                   "the printk ring buffer in the slice's RAM (found through its VMCOREINFO "
                                   "note). Read-only. Needs root on the live host.")
    p.add_argument("name", metavar="NAME", help="the slice's name (see coreslice list)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new records until interrupted")
    p.add_argument("--wait", metavar="REGEX",
                   help="print the log until a record matches REGEX, then exit 0 (exit 1 after --timeout)")
    p.add_argument("--timeout", type=_seconds, default=60.0, metavar="S", help="seconds --wait waits (default 60)")
    p.add_argument("--json", action="store_true",
                   help="records as JSON (one document; with --follow one record per line)")
    p.add_argument("--ledger", type=Path, metavar="PATH", help=LEDGER_HELP)
    p.add_argument("--host-root", type=root_arg, default=Path("/"), metavar="DIR",
                   help=f"a captured host tree (tests only, with {FAKE_MACHINE_ENV}=1)")
    p.set_defaults(func=_cmd_console)

    p = sub.add_parser("status", help="state of slices: running, panicked, halted, stopped ... (from their logs)",
                       description="For each slice of this host boot (or slice NAME, also when it has stopped): "
                                   "its state (launching, running, panicked, halted, stopped, failed, unknown), "
                                   "uptime, kernel release and last log line, read from the ledger and the "
                                   "kernel log in its RAM. Read-only. Needs root on the live host.")
    p.add_argument("name", metavar="NAME", nargs="?", help="one slice (default: all held in this host boot)")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.add_argument("--ledger", type=Path, metavar="PATH", help=LEDGER_HELP)
    p.add_argument("--host-root", type=root_arg, default=Path("/"), metavar="DIR",
                   help=f"a captured host tree (tests only, with {FAKE_MACHINE_ENV}=1)")
    p.set_defaults(func=_cmd_status)
