"""``eval run`` and ``eval plan`` on a fake host tree with a fake target: the mode's host boot is
checked before anything runs; N runs are parsed and written with their environment; a failing
step stops the server it started; missing tools are named with their package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coreslice import cli
from coreslice.cli import evalcmd
from coreslice.evaluation import targets

from ..hosttree import make_host_tree

DATA = Path(__file__).parent / "data"
NATIVE = "console=ttyS0 memory_corruption_check=0 pci=assign-busses mem=2G maxcpus=2 intremap=off intel_iommu=off"
ENV_OUT = "6.12.95+deb12-amd64\n2\nMemTotal:        2000000 kB\nbare\nroot=/dev/nvme0n1p1\npci 0000:01:10.1 0x8086:0x10ca igbvf\n"


class FakeTarget:
    def __init__(self, name="fake", missing=(), fail=()):
        self.name, self.missing, self.fail, self.calls = name, set(missing), set(fail), []

    def run(self, argv, timeout):
        argv = list(argv)
        self.calls.append(argv)
        if argv[:2] == ["sh", "-c"] and "uname -r" in argv[2]:
            return targets.Completed(0, ENV_OUT, "")
        if argv[:2] == ["sh", "-c"] and "command -v" in argv[2]:
            return targets.Completed(0, "".join(f"{m}\n" for m in self.missing if f"command -v {m} " in argv[2]), "")
        program = argv[0]
        if argv[:2] == ["sh", "-c"]:  # kv's wrappers: `sh -c SCRIPT memcaslap ...`, `setsid memcached ...`
            program = argv[3] if len(argv) > 3 else ("memcached" if "setsid memcached" in argv[2] else "sh")
        if program in self.fail:
            return targets.Completed(1, "", f"{program}: connection refused")
        out = {"sysbench": (DATA / "sysbench-cpu.txt").read_text(), "memcaslap": (DATA / "memcaslap-peak.txt").read_text()}
        return targets.Completed(0, out.get(program, ""), "")


@pytest.fixture
def env(tmp_path, monkeypatch, bzimage):
    """web1 declared with 2 CPUs and 2G; the host booted as its native baseline."""
    def host(cmdline=NATIVE, online="0-1"):
        root = make_host_tree(tmp_path / f"host-{len(list(tmp_path.glob('host-*')))}", online=online, cmdline=cmdline)
        monkeypatch.setattr(evalcmd, "HOST_ROOT", root)
    host()
    sdir = tmp_path / "slices"
    sdir.mkdir()
    (sdir / "web1.toml").write_text(f'kernel = "{bzimage}"\nconsole = "io:0x2f8"\ncpus = "1-2"\nmemory = "2G"\n')
    monkeypatch.setenv("CORESLICE_SLICES_DIR", str(sdir))
    monkeypatch.setenv("CORESLICE_LEDGER", str(tmp_path / "ledger.sqlite3"))
    fakes = {"local": FakeTarget("this host"), "remote": FakeTarget("root@10.0.0.2")}
    monkeypatch.setattr(evalcmd, "local_target", lambda: fakes["local"])
    monkeypatch.setattr(evalcmd, "make_target", lambda dest, key=None: fakes["remote"])
    return {"tmp": tmp_path, "fakes": fakes, "host": host}


def main(capsys, *argv):
    rc = cli.main(["eval", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_native_runs_are_parsed_and_written_with_their_environment(env, capsys):
    out_dir = env["tmp"] / "ev" / "native"
    rc, out, err = main(capsys, "run", "--mode", "native", "--like", "web1", "--workload", "cpu", "--repeat", "3",
                        "--seconds", "5", "--out", str(out_dir), "--json")
    assert rc == 0, err
    doc = json.loads((out_dir / "cpu-native.json").read_text())
    assert [r["metrics"] for r in doc["runs"]] == [{"events_per_s": 806.19}] * 3
    assert doc["environment"]["kernel"] == "6.12.95+deb12-amd64" and doc["environment"]["cpus"] == 2
    assert doc["environment"]["pci"] == ["0000:01:10.1 0x8086:0x10ca igbvf"]
    assert doc["environment"]["host_profile_gaps"] == [] and doc["environment"]["mode"] == "native"
    calls = [c for c in env["fakes"]["local"].calls if c[0] == "sysbench"]
    assert calls == [["sysbench", "cpu", "--threads=2", "--time=5", "run"]] * 3  # the slice's 2 CPUs
    assert (out_dir / "raw" / "cpu-native-2-sysbench.txt").read_text().startswith("sysbench 1.0.20")
    assert json.loads(out)["file"] == str(out_dir / "cpu-native.json")


def test_a_mode_whose_host_boot_is_not_running_is_refused_before_anything_runs(env, capsys):
    env["host"](cmdline="console=ttyS0 maxcpus=1 mem=6G intel_iommu=off", online="0")
    rc, _out, err = main(capsys, "run", "--mode", "native", "--like", "web1", "--workload", "cpu",
                         "--out", str(env["tmp"] / "ev"))
    assert rc == 2
    assert "1 CPUs online, the slice has 2" in err and "mem=6G" in err
    assert "host configure --profile native-eval --host-cpus 2 --host-mem 2G" in err
    rc, _out, err = main(capsys, "run", "--mode", "vm", "--like", "web1", "--workload", "cpu", "--ssh", "root@vm",
                         "--out", str(env["tmp"] / "ev"))
    assert rc == 2 and "intel_iommu=on" in err and "--profile vm-host" in err
    rc, _out, err = main(capsys, "run", "--mode", "slice", "--like", "web1", "--workload", "cpu", "--ssh", "root@s",
                         "--out", str(env["tmp"] / "ev"))
    assert rc == 2 and "slice 'web1' is not running" in err
    assert env["fakes"]["local"].calls == [] and env["fakes"]["remote"].calls == []
    assert not (env["tmp"] / "ev").exists()
    # --any-profile runs anyway and records what differed.
    rc, _out, err = main(capsys, "run", "--mode", "native", "--like", "web1", "--workload", "cpu", "--repeat", "1",
                         "--any-profile", "--out", str(env["tmp"] / "ev"))
    assert rc == 0, err
    doc = json.loads((env["tmp"] / "ev" / "cpu-native.json").read_text())
    assert any("1 CPUs online" in g for g in doc["environment"]["host_profile_gaps"])


def test_missing_tools_are_named_with_their_packages(env, capsys):
    env["fakes"]["local"].missing = {"sysbench"}
    rc, _out, err = main(capsys, "run", "--mode", "native", "--like", "web1", "--workload", "cpu",
                         "--out", str(env["tmp"] / "ev"))
    assert rc == 2 and "needs sysbench on this host" in err and "--eval-tools" in err
    assert not [c for c in env["fakes"]["local"].calls if c[0] == "sysbench"]


def test_a_failing_client_stops_the_server_it_started(env, capsys):
    env["fakes"]["local"].fail = {"memcaslap"}
    rc, _out, err = main(capsys, "run", "--mode", "native", "--like", "web1", "--workload", "kv", "--repeat", "2",
                         "--seconds", "1", "--out", str(env["tmp"] / "ev"))
    assert rc == 1 and "memcaslap" in err and "connection refused" in err
    calls = env["fakes"]["local"].calls
    started = [i for i, c in enumerate(calls) if c[:2] == ["sh", "-c"] and "setsid memcached" in c[2]]
    stopped = [i for i, c in enumerate(calls) if c[:2] == ["sh", "-c"] and c[2].startswith("p=$(cat")]
    assert len(started) == 1 and len(stopped) == 1 and stopped[0] > started[0]
    assert not (env["tmp"] / "ev" / "kv-native.json").exists()


def test_dry_run_and_parameters(env, capsys):
    rc, out, _err = main(capsys, "run", "--mode", "native", "--like", "web1", "--workload", "kv", "--kv-sweep",
                         "64,16", "--dry-run", "--json")
    assert rc == 0
    doc = json.loads(out)
    assert "setsid memcached" in doc["steps"][0]["argv"][2]
    assert [s["argv"][3] for s in doc["steps"][1:]] == ["memcaslap"] * 3
    assert doc["steps"][2]["argv"][-2:] == ["-S", "20s"] and "16" in doc["steps"][2]["argv"]
    assert "127.0.0.1:11311" in doc["steps"][1]["argv"]  # web1's image has no address: loopback
    assert env["fakes"]["local"].calls == []
    rc, _out, err = main(capsys, "run", "--mode", "native", "--like", "web1", "--workload", "storage", "--dry-run")
    assert rc == 2 and "--disk DEV" in err
    rc, _out, err = main(capsys, "run", "--mode", "native", "--like", "web1", "--workload", "cpu", "--repeat", "0",
                         "--out", "x")
    assert rc == 2 and "--repeat 0" in err
    rc, _out, err = main(capsys, "run", "--mode", "vm", "--like", "web1", "--workload", "cpu", "--any-profile",
                         "--out", "x")
    assert rc == 2 and "needs --ssh" in err


def test_plan_marks_the_running_boot(env, capsys):
    rc, out, _err = main(capsys, "plan", "--like", "web1", "--workloads", "cpu,storage", "--repeat", "5", "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["here"] == "native" and [s["mode"] for s in doc["steps"]] == ["slice", "vm", "native", "report"]
    native = doc["steps"][2]
    assert native["here"] and "--host-cpus 2 --host-mem 2G" in native["boot"]
    assert native["commands"][0] == "coreslice native-setup --like web1"
    assert any("--workload storage --disk" in c for c in native["commands"])
    rc, out, _err = main(capsys, "plan", "--like", "web1")
    assert "<- this host boot" in out.splitlines()[[i for i, line in enumerate(out.splitlines())
                                                     if "native" in line and line[0].isdigit()][0]]


def test_ssh_destinations():
    s = targets.parse_dest("root@10.0.0.2:2222")
    assert s.argv(["sysbench", "cpu", "run"])[-3:] == ["root@10.0.0.2", "--", "sysbench cpu run"]
    assert "-p" in s.argv(["x"]) and "BatchMode=yes" in s.argv(["x"])
    for bad in ("-oProxyCommand=x", "root@host:99999", "a b"):
        with pytest.raises(Exception, match="port|is not"):
            targets.parse_dest(bad)


def test_graph_runs_for_real_here_and_reports(env, capsys, monkeypatch):
    """No fake target: the graph workload's BFS runs on this machine (networkx from the test
    dependencies, python3 from coreslice's own environment), then eval report reads the file."""
    import os
    import sys

    monkeypatch.setattr(evalcmd, "local_target", targets.Local)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    out_dir = env["tmp"] / "ev" / "native"
    rc, _out, err = main(capsys, "run", "--mode", "native", "--like", "web1", "--workload", "graph", "--repeat", "2",
                         "--seconds", "1", "--graph-nodes", "3000", "--out", str(out_dir))
    assert rc == 0, err
    doc = json.loads((out_dir / "graph-native.json").read_text())
    assert len(doc["runs"]) == 2 and all(r["metrics"]["teps"] > 1000 for r in doc["runs"])
    assert doc["environment"]["kernel"] == os.uname().release
    rc, out, err = main(capsys, "report", str(env["tmp"] / "ev"), "--json")
    assert rc == 0, err
    cell = json.loads(out)["report"]["graph"]["native"]
    assert cell["n"] == 2 and cell["relative_to_native"] == 1.0 and cell["min"] <= cell["median"] <= cell["max"]


def test_native_needs_the_slices_vfs_and_no_running_slice():
    from coreslice.evaluation import modes
    from coreslice.plan.native import NativeSlice
    sl = NativeSlice("web1", "x", 2, 2 << 30, None, (), (), None, None)
    facts = modes.HostFacts(NATIVE, 2)
    assert modes.gaps("native", facts, sl, False) == []
    assert "is running" in " ".join(modes.gaps("native", facts, sl, True))
    assert "native-setup --like web1" in " ".join(modes.gaps("native", facts, sl, False, native_setup=False))
    assert modes.current(facts, sl, True) == "slice" and modes.current(facts, sl, False) == "native"
    assert modes.current(modes.HostFacts("intel_iommu=on iommu=pt", 8), sl, False) == "vm"
    assert modes.HostFacts("", 1, sys_vendor="QEMU\n").emulated and not modes.HostFacts("", 1, "Dell Inc.").emulated


def test_append_adds_runs_to_the_same_file(env, capsys):
    out_dir = env["tmp"] / "ev"
    base = ["run", "--mode", "native", "--like", "web1", "--workload", "cpu", "--seconds", "1", "--out", str(out_dir)]
    assert main(capsys, *base, "--repeat", "2")[0] == 0
    assert main(capsys, *base, "--repeat", "1", "--append")[0] == 0
    doc = json.loads((out_dir / "cpu-native.json").read_text())
    assert len(doc["runs"]) == 3 and doc["runs"][2]["raw"] == ["cpu-native-3-sysbench.txt"]
    assert main(capsys, *base, "--repeat", "1")[0] == 0  # without --append: replaced
    assert len(json.loads((out_dir / "cpu-native.json").read_text())["runs"]) == 1
