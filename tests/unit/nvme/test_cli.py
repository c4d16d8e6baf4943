"""``coreslice nvme ns ...`` through main(), on the recorded QEMU controller and a fake sysfs."""

from __future__ import annotations

import json

import pytest

from coreslice.cli import main
from coreslice.cli import nvme as nvme_cli
from coreslice.nvme import ops

from .fakes import BUILT, QEMU_START, FakeRun, add_block, constructed, host_tree, later


@pytest.fixture
def run(tmp_path, monkeypatch):
    run = FakeRun(*QEMU_START)
    root = host_tree(tmp_path / "host")
    run.root = root
    monkeypatch.setattr(nvme_cli, "make_cli", lambda: ops.NvmeCli(run=run))
    monkeypatch.setattr(nvme_cli, "SYSFS_ROOT", root)
    return run


def out_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_list_json(run, capsys):
    assert main(["nvme", "ns", "list", "nvme0", "--json"]) == 0
    d = out_json(capsys)
    assert d["ok"] is True
    assert d["controller"]["cntlid"] == 0 and d["controller"]["ns_create"] is False
    assert [(n["nsid"], n["lba_size"], n["size_bytes"], n["controllers"], n["block_device"]) for n in d["namespaces"]] == \
        [(1, 512, 64 << 20, [0], "/dev/nvme0n1"), (2, 4096, 64 << 20, [], None)]


def test_list_text(run, capsys):
    assert main(["nvme", "ns", "list", "0000:00:02.0"]) == 0
    out = capsys.readouterr().out
    assert "nsid 1: 64M in 512-byte blocks; 0x0 (this host's nvme0); /dev/nvme0n1" in out
    assert "nsid 2: 64M in 4096-byte blocks; not attached" in out and "(attach only)" in out


def test_create_json(run, capsys):
    constructed(run).add_file("create-ns /dev/nvme0 --nsze=2097152 --ncap=2097152 --flbas=4", BUILT / "create-ns.out")
    assert main(["nvme", "ns", "create", "/dev/nvme0", "--size", "8G", "--json"]) == 0
    assert out_json(capsys) == {"ok": True, "controller": "nvme0", "nsid": 3, "size_bytes": 8 << 30, "lba_size": 4096}


def test_refusal_exits_2_with_one_json_line(run, capsys):
    assert main(["nvme", "ns", "create", "nvme0", "--size", "8G", "--json"]) == 2
    cap = capsys.readouterr()
    d = json.loads(cap.out)
    assert d["ok"] is False and d["exit_code"] == 2 and "no Namespace Management command" in d["error"]
    assert cap.err.count("\n") == 1 and run.mutations() == []


def test_bad_size_refused_before_nvme_runs(run, capsys):
    assert main(["nvme", "ns", "create", "nvme0", "--size", "lots"]) == 2
    assert "--size 'lots' is not a size" in capsys.readouterr().err and run.calls == []


def test_attach_host_json(run, capsys):
    run.use("attach-ns-2").add("ns-rescan /dev/nvme0")
    timer = later(0.2, lambda: add_block(run.root, "nvme0n2", 2))
    try:
        assert main(["nvme", "ns", "attach", "nvme0", "2", "--host", "--wait", "5", "--json"]) == 0
    finally:
        timer.cancel()
    assert out_json(capsys) == {"ok": True, "controller": "nvme0", "nsid": 2, "target": "host", "cntlid": 0,
                                "block_device": "/dev/nvme0n2"}


def test_attach_host_deadline_exits_1(run, capsys):
    run.use("attach-ns-2").add("ns-rescan /dev/nvme0")
    assert main(["nvme", "ns", "attach", "nvme0", "2", "--host", "--wait", "0.2", "--json"]) == 1
    assert "no block device with nsid 2" in out_json(capsys)["error"]


def test_attach_vf_refused_and_controller_attach(run, capsys):
    assert main(["nvme", "ns", "attach", "nvme0", "2", "--vf", "0"]) == 2
    assert "VFs not yet enabled" in capsys.readouterr().err
    run.use("attach-ns-2-offline-vf")  # QEMU itself lets an offline secondary take a namespace
    assert main(["nvme", "ns", "attach", "nvme0", "2", "--controller", "0x1", "--json"]) == 0
    assert out_json(capsys)["cntlid"] == 1


def test_attach_needs_one_target(run, capsys):
    assert main(["nvme", "ns", "attach", "nvme0", "2"]) == 2
    assert "one of the arguments --host --vf --controller is required" in capsys.readouterr().err
    assert main(["nvme", "ns", "attach", "nvme0", "2", "--host", "--vf", "0"]) == 2


def test_detach_and_delete_refusals(run, capsys):
    assert main(["nvme", "ns", "detach", "nvme0", "2", "--all"]) == 2
    assert "not attached to any controller" in capsys.readouterr().err
    constructed(run)
    assert main(["nvme", "ns", "delete", "nvme0", "1", "--json"]) == 2
    assert "detach it first: coreslice nvme ns detach nvme0 1 --all" in out_json(capsys)["error"]
    assert run.mutations() == []


def test_delete_json(run, capsys):
    constructed(run).add_file("delete-ns /dev/nvme0 -n 2", BUILT / "delete-ns.out")
    assert main(["nvme", "ns", "delete", "nvme0", "2", "--json"]) == 0
    assert out_json(capsys) == {"ok": True, "controller": "nvme0", "nsid": 2, "deleted": True}


@pytest.mark.parametrize("argv", [[], ["ns"], ["ns", "list"], ["ns", "create"], ["ns", "attach"],
                                  ["ns", "detach"], ["ns", "delete"]])
def test_help_runs(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["nvme", *argv, "--help"])
    assert e.value.code == 0
    assert "usage: coreslice nvme" in capsys.readouterr().out
