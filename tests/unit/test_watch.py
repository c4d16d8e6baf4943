"""`coreslice watch`: the decision (watching.decide, pure) and the loop around it, with status
played by a stand-in script (its JSON contract) and restart by the real `coreslice restart` on
the fake machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coreslice import cli, watching
from coreslice.cli import watch
from coreslice.ledger import Ledger
from coreslice.watching import Policy, Seen, decide

from .hosttree import BOOT_ID, make_host_tree

P = Policy(max_restarts=2, window_s=600)


def s(name="web", state="running", on_crash="restart", reason=None) -> dict:
    return {"name": name, "state": state, "on_crash": on_crash, "reason": reason}


def kinds(step) -> list[tuple[str, str | None]]:
    return [(e.kind, e.slice) for e in step.events]


def test_a_crashed_slice_that_asked_for_it_is_restarted():
    step = decide({}, [s(state="panicked", reason="Kernel panic - not syncing: x")], 1000.0, P)
    assert step.restart == ["web"]
    assert kinds(step) == [("state", "web"), ("restart", "web")]
    assert step.events[0].message == "web: panicked (Kernel panic - not syncing: x)"
    assert step.events[1].message == ("web: panicked (Kernel panic - not syncing: x): restarting it "
                                      "(attempt 1 of at most 2 restarts in 10 min)")
    assert step.seen["web"] == Seen("panicked", (1000.0,), False)
    assert decide({}, [s(state="halted")], 0.0, P).restart == ["web"]


@pytest.mark.parametrize("state", ["launching", "running", "stopped", "failed", "unknown"])
def test_other_states_are_never_restarted(state):
    assert decide({}, [s(state=state)], 0.0, P).restart == []


def test_on_crash_none_is_logged_and_left_alone():
    step = decide({"web": Seen("running")}, [s(state="panicked", on_crash=None)], 0.0, P)
    assert step.restart == [] and [e.message for e in step.events] == [
        "web: running -> panicked; on-crash is none: left as it is"]
    assert decide(step.seen, [s(state="panicked", on_crash=None)], 5.0, P).events == []  # said once


def test_only_changes_are_logged():
    step = decide({}, [s(), s("db")], 0.0, P)
    assert [e.message for e in step.events] == ["web: running", "db: running"]
    step = decide(step.seen, [s(), s("db")], 5.0, P)
    assert step.events == [] and step.restart == []
    step = decide(step.seen, [s("db", state="stopped")], 10.0, P)
    assert [e.message for e in step.events] == ["db: running -> stopped",
                                                "web: no longer listed by coreslice status (was running)"]
    assert set(step.seen) == {"db"}


def test_back_off_at_most_n_restarts_per_window_then_give_up_once():
    seen: dict = {}
    restarts = []
    for t in (0.0, 5.0, 10.0, 15.0, 20.0):  # it keeps panicking
        step = decide(seen, [s(state="panicked")], t, P)
        seen = step.seen
        restarts.append((t, step.restart, [e.kind for e in step.events]))
    assert restarts == [(0.0, ["web"], ["state", "restart"]), (5.0, ["web"], ["restart"]),
                        (10.0, [], ["gave-up"]), (15.0, [], []), (20.0, [], [])]
    gave_up = decide({"web": Seen("panicked", (0.0, 5.0))}, [s(state="panicked")], 10.0, P).events[0].message
    assert gave_up == ("web: not restarting it: 2 restarts in the last 10 min (at most 2 restarts in 10 min); it "
                       "stays panicked: look at its log (coreslice console web), then coreslice restart web")
    # Once the first attempt leaves the window, one more is allowed.
    step = decide(seen, [s(state="panicked")], 601.0, P)
    assert step.restart == ["web"] and step.seen["web"].restarts == (5.0, 601.0)


def test_a_crash_loop_stays_bounded_but_a_hand_restart_resets_the_budget():
    # Our own restart worked: running again, but its attempts still count.
    step = decide({"web": Seen("panicked", (0.0, 5.0))}, [s(state="running")], 10.0, P)
    assert step.seen["web"].restarts == (0.0, 5.0)
    assert decide(step.seen, [s(state="panicked")], 20.0, P).restart == []
    # Given up, then someone restarted it by hand: watched anew.
    step = decide({"web": Seen("panicked", (0.0, 5.0), gave_up=True)}, [s(state="running")], 30.0, P)
    assert step.seen["web"] == Seen("running", (), False)
    assert decide(step.seen, [s(state="panicked")], 40.0, P).restart == ["web"]


def test_max_restarts_zero_never_restarts():
    step = decide({}, [s(state="panicked")], 0.0, Policy(0, 600))
    assert step.restart == [] and [e.kind for e in step.events] == ["state", "gave-up"]


def test_status_entries_without_a_name_are_skipped():
    assert decide({}, [{"state": "panicked"}, {"name": 3}], 0.0, P) == watching.Step({}, [], [])


# -- the loop, with child processes ------------------------------------------------------------------

STATUS = """\
import json, sys
doc = open(sys.argv[1]).read()
try:
    ok = json.loads(doc).get("ok")
except ValueError:  # as coreslice fails without --json output
    sys.exit("coreslice: error: " + doc)
print(doc)
sys.exit(0 if ok else 1)
"""


@pytest.fixture
def status_doc(tmp_path, monkeypatch):
    """Where the stand-in `coreslice status --json` reads what it prints."""
    script = tmp_path / "status.py"
    script.write_text(STATUS)
    doc = tmp_path / "status.json"
    monkeypatch.setattr(watch.Watcher, "status_argv", lambda self: [sys.executable, str(script), str(doc)])
    return doc


def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_once_restarts_a_panicked_slice_with_the_real_restart(tmp_path, bzimage, status_doc, monkeypatch, capsys):
    tree = make_host_tree(tmp_path / "host")
    ledger = tmp_path / "ledger.sqlite3"
    monkeypatch.setenv("CORESLICE_FAKE_MACHINE", "1")
    common = ["--host-root", str(tree), "--ledger", str(ledger)]
    assert cli.main(["boot", "--kernel", str(bzimage), "--cpus", "1", "--memory", "512M", "--console", "none",
                     "--name", "web", "--on-crash", "restart", *common]) == 0
    status_doc.write_text(json.dumps({"ok": True, "ledger": str(ledger), "slices": [
        s(state="panicked", reason="Kernel panic"), s("db", state="halted", on_crash="none")]}))
    capsys.readouterr()
    assert cli.main(["watch", "--once", "--json-lines", *common]) == 0
    events = _lines(capsys.readouterr().out)
    assert [(e["event"], e["slice"]) for e in events] == [
        ("state", "web"), ("restart", "web"), ("state", "db"), ("restarted", "web")]
    assert events[-1]["message"] == "web: restarted: CPUs 1, 512M@0x40000000"
    rows = Ledger(ledger, BOOT_ID, readonly=True).slices(history=True)
    assert [(r.name, r.state) for r in rows] == [("web", "stopped"), ("web", "running")]
    # A restart that fails (no such slice) is logged, and --once says so.
    status_doc.write_text(json.dumps({"ok": True, "slices": [s("ghost", state="panicked")]}))
    assert cli.main(["watch", "--once", *common]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["ghost: panicked", "ghost: panicked: restarting it (attempt 1 of at most 3 restarts in 10 min)"]
    assert out[2].startswith("ghost: restart failed: no slice named 'ghost' in this host boot")


def test_a_failing_status_is_logged_and_once_fails(status_doc, capsys):
    status_doc.write_text(json.dumps({"ok": False, "error": "ledger is damaged; move it aside"}))
    assert cli.main(["watch", "--once"]) == 1
    assert capsys.readouterr().out == ("coreslice status failed: ledger is damaged; move it aside "
                                       "(retrying every round)\n")
    status_doc.write_text("no status command; see 'coreslice --help'")
    assert cli.main(["watch", "--once"]) == 1
    assert capsys.readouterr().out == ("coreslice status failed: no status command; see 'coreslice --help' "
                                       "(retrying every round)\n")


def test_sigterm_stops_the_watcher_cleanly(tmp_path):
    """The real command as systemd runs it: a long interval, then SIGTERM."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    p = subprocess.Popen([sys.executable, "-m", "coreslice", "watch", "--interval", "300", "--ledger",
                          str(tmp_path / "l.sqlite3")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": src}, cwd=tmp_path)
    try:
        first = p.stdout.readline()
        assert first.startswith("watching the slices every 300 s"), first
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert out.splitlines()[-1] == "stopped (SIGTERM)"


def test_a_status_error_is_said_once_and_its_end_too(status_doc):
    args = cli.build_parser().parse_args(["watch"])
    said: list[str] = []
    w = watch.Watcher(args, lambda e: said.append(e.message))
    stop = watch.threading.Event()
    status_doc.write_text(json.dumps({"ok": False, "error": "boom"}))
    assert w.round(stop) is False and w.round(stop) is False
    status_doc.write_text(json.dumps({"ok": True, "slices": []}))
    assert w.round(stop) is True and w.round(stop) is True
    assert said == ["coreslice status failed: boom (retrying every round)", "coreslice status answers again"]
