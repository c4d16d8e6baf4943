"""The command line's own refusals: argparse errors and host roots, in the project's one-line form."""

from __future__ import annotations

import json

import pytest

from coreslice import cli

from .hosttree import make_host_tree


def _run(capsys, argv):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv, message", [
    (["list", "--bogus"], "unrecognized arguments: --bogus; see 'coreslice list --help'"),
    (["host", "configure", "--profile", "slice-host", "--nope", "1"],
     "unrecognized arguments: --nope 1; see 'coreslice host configure --help'"),
    ([], "the following arguments are required: COMMAND; see 'coreslice --help'"),
    (["host"], "the following arguments are required: COMMAND; see 'coreslice host --help'"),
    (["host", "configure"], "the following arguments are required: --profile; see 'coreslice host configure --help'"),
    (["host", "configure", "--profile", "x"],
     "argument --profile: invalid choice: 'x' (choose from 'slice-host', 'vm-host', 'native-eval'); "
     "see 'coreslice host configure --help'"),
    (["plan", "--ncpus", "two"], "argument --ncpus: 'two' is not a whole number >= 1; give e.g. 2; see 'coreslice plan --help'"),
    (["plan", "--cpus", "1-4000000000"],
     "argument --cpus: not a CPU list: CPU 4000000000 is above 65535 (Linux on x86 runs at most 8192 CPUs, "
     "NR_CPUS); write e.g. 1-2,5; see 'coreslice plan --help'"),
    (["plan", "--cpus", "1\n2"], "argument --cpus: not a CPU list: '1 2' is not a CPU number"),
    (["dsdt", "--devices", "0000:00:01.0", "--cpus", "-1"], "argument --cpus: '-1' is not a CPU count; give 1 to 4096"),
    (["list", "--ledger"], "argument --ledger: expected one argument; see 'coreslice list --help'"),
])
@pytest.mark.parametrize("as_json", [False, True])
def test_argparse_errors_are_one_line(capsys, argv, message, as_json):
    rc, out, err = _run(capsys, argv + (["--json"] if as_json else []))
    assert rc == 2 and err.count("\n") == 1 and "usage:" not in err, err
    assert err.startswith("coreslice: error: " + message)
    if as_json:
        doc = json.loads(out)
        assert doc == {"ok": False, "error": err[len("coreslice: error: "):-1], "exit_code": 2}
    else:
        assert out == ""


def test_help_and_version_still_work(capsys):
    for argv in (["--help"], ["host", "configure", "--help"], ["plan", "-h"], ["--version"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
        assert capsys.readouterr().out.startswith(("usage: coreslice", "coreslice 0."))


def test_control_characters_in_an_error_stay_on_one_line(capsys):
    rc, _, err = _run(capsys, ["plan", "--ncpus", "1\x1b[2J\r\u2028x"])
    assert rc == 2 and err.count("\n") == 1 and len(err.splitlines()) == 1
    assert "\x1b" not in err and "'1\\x1b[2J\\r\\u2028x'" in err


@pytest.mark.parametrize("argv", [
    ["list", "--host-root"], ["plan", "--ncpus", "1", "--memory", "1G", "--host-root"],
    ["stop", "web", "--host-root"], ["host", "check", "--root"], ["host", "show", "--root"],
    ["host", "configure", "--profile", "slice-host", "--dry-run", "--root"],
    ["dsdt", "--devices", "0000:00:01.0", "--root"],
])
@pytest.mark.parametrize("make", ["missing", "file", "empty"])
def test_a_root_that_is_no_directory_is_refused(capsys, tmp_path, argv, make):
    root = tmp_path / "tree"
    if make == "file":
        root.write_text("")
    elif make == "empty":  # e.g. the wrong level of a tree: it would read as an invented 1-CPU host
        root.mkdir()
    rc, out, err = _run(capsys, [*argv, str(root), "--json"] if argv[0] != "dsdt" else [*argv, str(root)])
    problem = {"missing": "no such directory", "file": "not a directory",
               "empty": "holds no sys/devices/system/cpu/present, so it is no captured host tree"}[make]
    assert rc == 2 and err.count("\n") == 1, err
    assert f": {root}: {problem}; pass a captured host tree (scripts/capture-host.sh), or / for this host" in err
    assert not root.exists() or root.is_file() or not any(root.iterdir())


def test_a_good_root_still_works(capsys, tmp_path):
    tree = make_host_tree(tmp_path / "host")
    rc, out, _ = _run(capsys, ["list", "--host-root", str(tree), "--ledger", str(tmp_path / "l.sqlite3"), "--json"])
    assert rc == 0 and json.loads(out)["ok"] is True


@pytest.mark.parametrize("flags, message", [
    (["--name", "web\nprod"], r"--name 'web\nprod' is not a slice name; use 1-63 letters"),
    (["--name", "\x1b[31mred"], r"--name '\x1b[31mred' is not a slice name"),
    (["--name=-web"], "--name '-web' is not a slice name"),
    (["--name", "a" * 64], "is not a slice name; use 1-63 letters"),
    (["--name", "wéb"], "is not a slice name"),
    (["--device", "0000:00:02.0\nx"], r"--device '0000:00:02.0\nx' is not a PCI address; write SEGMENT:BUS"),
])
def test_plan_checks_names_and_devices_as_boot_does(capsys, tmp_path, flags, message):
    tree = make_host_tree(tmp_path / "host")
    rc, out, err = _run(capsys, ["plan", "--ncpus", "1", "--memory", "512M", "--host-root", str(tree),
                                 "--ledger", str(tmp_path / "l.sqlite3"), *flags, "--json"])
    assert rc == 2 and err.count("\n") == 1 and len(err.splitlines()) == 1, err
    assert message in err and json.loads(out)["exit_code"] == 2
    rc, out, _ = _run(capsys, ["plan", "--ncpus", "1", "--memory", "512M", "--host-root", str(tree),
                               "--ledger", str(tmp_path / "l.sqlite3"), "--name", "web-1.a_b", "--device", "00:02.0",
                               "--json"])
    assert rc == 0 and json.loads(out)["devices"] == ["0000:00:02.0"]


def test_json_after_double_dash_is_a_name_not_the_option(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CORESLICE_FAKE_MACHINE", "1")  # stop on a captured tree
    tree = make_host_tree(tmp_path / "host")
    rc, out, err = _run(capsys, ["stop", "--host-root", str(tree), "--ledger", str(tmp_path / "l"), "--", "--json"])
    assert rc == 2 and "no slice named '--json'" in err and out == ""
    rc, out, err = _run(capsys, ["list", "--bogus", "--", "--json"])
    assert rc == 2 and out == "" and err.count("\n") == 1
