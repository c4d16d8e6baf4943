"""The testbed's NUMA option (-numa, which gives the emulated machine an SRAT) and the ledger
path it gives `coreslice boot` inside the emulated host."""

from pathlib import Path

import pytest

from coreslice.errors import UsageError
from coreslice.cli import testbed as testbed_cli
from coreslice.testbed.job import LEDGER_PATH, render_job_script
from coreslice.testbed.qemu import MachineConfig, build_command, numa_args


def test_no_numa_by_default():
    cfg = MachineConfig(kernel=Path("/k"), append="")
    assert cfg.numa == 0 and numa_args(0, 4, "6G") == []
    assert "-numa" not in build_command(cfg, Path("/c.log"), [])


def test_two_nodes_split_cpus_and_memory():
    assert numa_args(2, 4, "6G") == [
        "-object", "memory-backend-ram,id=ram-node0,size=3072M", "-numa", "node,nodeid=0,cpus=0-1,memdev=ram-node0",
        "-object", "memory-backend-ram,id=ram-node1,size=3072M", "-numa", "node,nodeid=1,cpus=2-3,memdev=ram-node1",
    ]
    # 5 CPUs: the first node gets the extra one; the last node gets what does not divide.
    args = numa_args(2, 5, "5G")
    assert [a for a in args if a.startswith("node,")] == ["node,nodeid=0,cpus=0-2,memdev=ram-node0",
                                                          "node,nodeid=1,cpus=3-4,memdev=ram-node1"]
    assert "memory-backend-ram,id=ram-node1,size=2560M" in args
    cmd = build_command(MachineConfig(kernel=Path("/k"), append="", smp=5, memory="5G", numa=2), Path("/c"), [])
    assert cmd[cmd.index("-m") + 2:cmd.index("-m") + 4] == ["-object", "memory-backend-ram,id=ram-node0,size=2560M"]


def test_bad_numa_counts():
    with pytest.raises(UsageError, match="--numa 5: give between 1 and --smp"):
        numa_args(5, 4, "6G")


def test_cli_option():
    import argparse
    p = argparse.ArgumentParser()
    testbed_cli.add_run_arguments(p)
    assert p.parse_args([]).numa == 0
    assert p.parse_args(["--numa", "2"]).numa == 2


def test_job_exports_a_writable_ledger_path():
    text = render_job_script(Path("/r"), "/py", "/src", [], [])
    assert f"export CORESLICE_LEDGER={LEDGER_PATH}" in text
    assert LEDGER_PATH.startswith("/run/")  # a tmpfs in the emulated host; its / is read-only
