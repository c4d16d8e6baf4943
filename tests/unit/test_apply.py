"""`coreslice apply`: declared slices are started by real `coreslice boot` child processes on the
fake machine (CORESLICE_FAKE_MACHINE=1, a captured host tree).  Each child's machine lives and
dies with it; its ledger row stays, and that is what apply's started / unchanged / drift work on."""

from __future__ import annotations

import json
import sqlite3

import pytest

from coreslice import cli
from coreslice.ledger import Ledger

from .hosttree import BOOT_ID, make_host_tree, two_node_srat


@pytest.fixture
def tree(tmp_path):
    return make_host_tree(tmp_path / "host", ncpus=6, srat=two_node_srat(6))


@pytest.fixture
def env(tmp_path, tree, bzimage, monkeypatch):
    monkeypatch.setenv("CORESLICE_FAKE_MACHINE", "1")
    monkeypatch.delenv("CORESLICE_SLICES_DIR", raising=False)
    slices = tmp_path / "slices"
    slices.mkdir()
    (slices / "vmlinuz").symlink_to(bzimage)
    ledger = tmp_path / "ledger.sqlite3"
    return {"slices": slices, "ledger": ledger, "tree": tree,
            "args": ["--slices-dir", str(slices), "--host-root", str(tree), "--ledger", str(ledger)]}


WEB = 'kernel = "vmlinuz"\nncpus = 1\nmemory = "512M"\nconsole = "none"\ncmdline = "quiet"\non-crash = "restart"\n'
DB = 'kernel = "vmlinuz"\ncpus = "3-4"\nmemory = "1G"\nconsole = "io:0x2f8"\n'


def _apply(capsys, env, *extra):
    rc = cli.main(["apply", *env["args"], *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def _doc(capsys, env, *extra):
    rc, out, err = _apply(capsys, env, "--json", *extra)
    doc = json.loads(out)
    return rc, doc, {s["name"]: s for s in doc["slices"]}


def _rows(env):
    return [(r.id, r.name, r.state) for r in Ledger(env["ledger"], BOOT_ID, readonly=True).slices(history=True)]


def test_apply_starts_what_is_declared_then_leaves_it_alone(capsys, env):
    (env["slices"] / "web.toml").write_text(WEB)
    (env["slices"] / "db.toml").write_text(DB)
    # --dry-run: the boots it would run, nothing started (no ledger file either).
    rc, doc, by = _doc(capsys, env, "--dry-run")
    assert rc == 0 and doc["ok"] and [s["action"] for s in doc["slices"]] == ["would-start", "would-start"]
    assert by["web"]["argv"][:3] == ["boot", f"--kernel={env['slices']}/vmlinuz", "--ncpus=1"]
    assert not env["ledger"].exists()
    # For real: two child boots, in file-name order.
    rc, doc, by = _doc(capsys, env)
    assert rc == 0 and doc["ok"], doc
    assert [(s["name"], s["action"], s["error"]) for s in doc["slices"]] == [("db", "started", None),
                                                                            ("web", "started", None)]
    assert by["db"]["slice"]["cpus"] == [3, 4] and by["web"]["slice"]["cpus"] == [1]
    rows = _rows(env)
    assert [(n, s) for _, n, s in rows] == [("db", "running"), ("web", "running")]
    assert by["web"]["slice"]["request"][:-1] == [f"--kernel={env['slices']}/vmlinuz", "--cmdline=quiet",
                                                  "--console=none", "--on-crash=restart"]
    assert by["web"]["slice"]["request"][-1].startswith("--tsc-khz=")  # what the boot read from the host
    # Again: both run as declared, nothing is booted.
    rc, doc, by = _doc(capsys, env)
    assert rc == 0 and [(s["action"], s["drift"]) for s in doc["slices"]] == [("unchanged", []), ("unchanged", [])]
    assert _rows(env) == rows
    rc, out, _ = _apply(capsys, env)
    assert rc == 0 and out.splitlines() == ["db: running as declared", "web: running as declared"]


def test_a_changed_declaration_is_drift_and_changes_nothing(capsys, env):
    (env["slices"] / "web.toml").write_text(WEB)
    assert _apply(capsys, env)[0] == 0
    rows = _rows(env)
    (env["slices"] / "web.toml").write_text(WEB.replace("quiet", "debug").replace('"restart"', '"none"')
                                            .replace("512M", "1G"))
    rc, doc, by = _doc(capsys, env)
    assert rc == 0 and by["web"]["action"] == "drift" and by["web"]["state"] == "running"
    assert by["web"]["drift"] == ["cmdline: declared debug, running quiet", "on-crash: declared none, running restart",
                                  "memory: declared 1G, running in 512M@0x40000000"]
    assert _rows(env) == rows
    rc, out, _ = _apply(capsys, env)
    assert out.startswith("web: drift: cmdline: declared debug, running quiet; on-crash: ") and \
        "(running, left as it is; to apply the declaration: coreslice stop web, then coreslice apply)" in out


def test_failures_are_reported_and_the_others_still_start(capsys, env):
    (env["slices"] / "a-bad.toml").write_text('kernel = "vmlinuz"\nncpu = 1\nconsole = "none"\n')
    (env["slices"] / "b-nokernel.toml").write_text('kernel = "missing"\nncpus = 1\nmemory = "512M"\nconsole = "none"\n')
    (env["slices"] / "c-good.toml").write_text(WEB)
    rc, doc, by = _doc(capsys, env)
    assert rc == 1 and doc["ok"] is False
    assert [s["action"] for s in doc["slices"]] == ["failed", "failed", "started"]
    assert by["a-bad"]["error"].endswith("a-bad.toml: ncpu: coreslice boot has no option --ncpu; did you mean "
                                         "'ncpus'? the keys are boot's long options (see coreslice boot --help)")
    assert "missing" in by["b-nokernel"]["error"] and "\n" not in by["b-nokernel"]["error"]  # boot's own line
    assert [(n, s) for _, n, s in _rows(env)] == [("c-good", "running")]
    rc, out, _ = _apply(capsys, env)
    assert rc == 1 and out.splitlines()[0].startswith("a-bad: failed: ") and "c-good: running as declared" in out


def test_slices_not_declared_are_listed_and_left_alone(capsys, env, bzimage):
    assert cli.main(["boot", "--kernel", str(bzimage), "--cpus", "5", "--memory", "512M", "--console", "none",
                     "--name", "byhand", "--host-root", str(env["tree"]), "--ledger", str(env["ledger"])]) == 0
    capsys.readouterr()
    rc, doc, by = _doc(capsys, env)
    assert rc == 0 and doc["slices"] == [{**by["byhand"], "action": "not-declared", "state": "running"}]
    rc, out, _ = _apply(capsys, env)
    assert out.splitlines() == [f"no slices declared in {env['slices']}", "byhand: not declared (running; left alone)"]


def test_a_row_recorded_without_its_request_cannot_be_compared(capsys, env):
    (env["slices"] / "web.toml").write_text(WEB)
    assert _apply(capsys, env)[0] == 0
    with sqlite3.connect(env["ledger"]) as con:  # as an older coreslice left it
        con.execute("UPDATE slices SET request = NULL")
    rc, doc, by = _doc(capsys, env)
    assert rc == 0 and by["web"]["action"] == "unchanged"
    assert by["web"]["note"] == "cannot compare: recorded without its request"
    assert _apply(capsys, env)[1] == "web: running; cannot compare: recorded without its request\n"


def test_the_slices_dir_comes_from_the_environment_and_must_exist_when_named(capsys, env, monkeypatch, tmp_path):
    (env["slices"] / "web.toml").write_text(WEB)
    monkeypatch.setenv("CORESLICE_SLICES_DIR", str(env["slices"]))
    rc = cli.main(["apply", "--dry-run", "--host-root", str(env["tree"]), "--ledger", str(env["ledger"])])
    assert rc == 0 and capsys.readouterr().out.startswith("web: would start: coreslice boot --kernel=")
    rc = cli.main(["apply", "--slices-dir", str(tmp_path / "nope"), "--host-root", str(env["tree"]), "--json"])
    out, err = capsys.readouterr()
    assert rc == 2 and json.loads(out)["ok"] is False and "nope: not a directory" in err


def test_relative_paths_given_to_apply_reach_the_boots(capsys, env, monkeypatch, tmp_path):
    """The boots run in / (as under systemd): apply hands them absolute paths."""
    (env["slices"] / "web.toml").write_text(WEB)
    monkeypatch.chdir(tmp_path)
    rel = ["--slices-dir", "slices", "--host-root", "host", "--ledger", "ledger.sqlite3"]
    assert cli.main(["apply", *rel]) == 0, capsys.readouterr()
    assert capsys.readouterr().out == "web: started: CPUs 1, 512M@0x40000000\n"
    assert [(n, s) for _, n, s in _rows(env)] == [("web", "running")]
