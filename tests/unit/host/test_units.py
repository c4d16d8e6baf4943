"""`coreslice host install-units`: the two systemd units (host/units.py), checked by systemd's own
verifier, and where they are written and enabled."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coreslice import cli
from coreslice.errors import CoresliceError, UsageError
from coreslice.host import units

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def test_the_units_run_this_coreslice():
    text = units.units()
    apply, watch = text[units.APPLY], text[units.WATCH]
    exe = os.path.abspath(sys.executable)
    assert f"\nExecStart={exe} -m coreslice apply\n" in apply
    assert f"\nExecStart={exe} -m coreslice watch\n" in watch
    for line in ("Type=oneshot", "RemainAfterExit=yes", "After=local-fs.target systemd-modules-load.service",
                 f"Before={units.WATCH}", "WantedBy=multi-user.target", "TimeoutStartSec=infinity"):
        assert f"\n{line}\n" in apply, line
    assert "\nExecStartPre=-" in apply and apply.split("ExecStartPre=-", 1)[1].split("\n")[0].endswith("modprobe msr")
    for line in ("Type=simple", "Restart=on-failure", f"After={units.APPLY}", "KillMode=mixed",
                 "WantedBy=multi-user.target"):
        assert f"\n{line}\n" in watch, line


@pytest.mark.parametrize("arg, word", [
    ("/usr/bin/python3", "/usr/bin/python3"),
    ("/opt/my venv/bin/python", '"/opt/my venv/bin/python"'),
    ('/a"b\\c', '"/a\\"b\\\\c"'),
    ("/x/100%/$HOME", '"/x/100%%/$$HOME"'),
])
def test_command_line_words_are_quoted_for_systemd(arg, word):
    assert units.quote(arg) == word


def _verify(d: Path) -> subprocess.CompletedProcess:
    return subprocess.run([SYSTEMD_ANALYZE, "verify", *(str(d / n) for n in (units.APPLY, units.WATCH))],
                          capture_output=True, text=True, cwd=d)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze missing: scripts/install-system-deps.sh --test")
@pytest.mark.parametrize("python", ["this", "with a space"])
def test_systemd_analyze_verify_accepts_the_units(tmp_path, python):
    cs = None
    if python != "this":  # the same interpreter, reached through a path systemd must quote
        odd = tmp_path / "my venv" / "bin"
        odd.mkdir(parents=True)
        (odd / "python").symlink_to(sys.executable)
        cs = [str(odd / "python"), "-m", "coreslice"]
    d = tmp_path / "units"
    r = units.install(d, text=units.units(cs))
    assert r.written and r.commands == []
    v = _verify(d)
    complaints = [ln for ln in (v.stdout + v.stderr).splitlines() if "coreslice-" in ln]
    assert v.returncode == 0 and complaints == [], v.stdout + v.stderr
    # The verifier is no rubber stamp: it names a key systemd does not know, or a missing program.
    bad = (d / units.APPLY).read_text().replace("RemainAfterExit=yes", "RemainAfterExit=yes\nRemainAfterExits=yes")
    (d / units.APPLY).write_text(bad)
    (d / units.WATCH).write_text(units.units(["/nonexistent/python", "-m", "coreslice"])[units.WATCH])
    v = _verify(d)
    out = v.stdout + v.stderr
    assert "Unknown key 'RemainAfterExits'" in out and "/nonexistent/python is not executable" in out


def _no_systemctl(argv):
    raise AssertionError(f"ran {argv}")


def test_another_dest_is_written_not_enabled_and_dry_run_writes_nothing(tmp_path):
    d = tmp_path / "a" / "b"
    r = units.install(d, dry_run=True, run=_no_systemctl)
    assert not r.written and not d.exists() and list(r.files) == [str(d / units.APPLY), str(d / units.WATCH)]
    r = units.install(d, run=_no_systemctl)
    assert r.written and sorted(p.name for p in d.iterdir()) == [units.APPLY, units.WATCH]
    assert oct((d / units.APPLY).stat().st_mode & 0o777) == "0o644"
    assert (d / units.WATCH).read_text() == units.units()[units.WATCH]


def test_the_system_dir_is_reloaded_and_enabled(tmp_path, monkeypatch):
    monkeypatch.setattr(units, "DEFAULT_DEST", tmp_path.resolve())
    ran = []

    def run(argv):
        ran.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")
    r = units.install(tmp_path, run=run)
    assert ran == [["systemctl", "daemon-reload"], ["systemctl", "enable", units.APPLY, units.WATCH]]
    assert [c["argv"] for c in r.commands] == ran

    def fails(argv):
        return subprocess.CompletedProcess(argv, 1, "", "Failed to connect to bus: No such file or directory\n")
    with pytest.raises(CoresliceError) as e:
        units.install(tmp_path, run=fails)
    assert e.value.exit_code == 1 and str(e.value) == (
        f"systemctl daemon-reload failed (Failed to connect to bus: No such file or directory); the units are "
        f"written in {tmp_path}: fix that, then run systemctl daemon-reload")


def test_an_unwritable_dest_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match=r"cannot write the units into .*file/x: Not a directory; choose another --dest"):
        units.install(tmp_path / "file" / "x")


def test_the_command(tmp_path, capsys):
    d = tmp_path / "units"
    assert cli.main(["host", "install-units", "--dest", str(d), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# {d / units.APPLY} (dry run: nothing written)\n") and "coreslice watch" in out
    assert not d.exists()
    assert cli.main(["host", "install-units", "--dest", str(d), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["written"] and doc["commands"] == [] and len(doc["files"]) == 2
    assert cli.main(["host", "install-units", "--dest", str(d)]) == 0
    assert "not enabled" in capsys.readouterr().out
