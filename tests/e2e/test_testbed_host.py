"""The emulated host boots, runs this tree's Python, and keeps to maxcpus=1 mem=1G.

Two QEMU boots (~20 s and ~8 s under TCG): the CLI contract with host commands, and the slice
initramfs booted as a whole machine.  Slices themselves, with the real loader, are in
test_slices.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import coreslice
from coreslice.testbed import qemu
from coreslice.testbed.run import RunOptions, run

pytestmark = pytest.mark.e2e
SRC = Path(coreslice.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cli_result(testbed_ready):
    cmd = [
        sys.executable, "-m", "coreslice.cli.testbed", "run", "--json", "--quiet",
        "--smp", "2", "--memory", "2G", "--timeout", "180",
        "--host-cmd", "python3 -c 'import coreslice,sys; print(coreslice.__file__, sys.version)'",
        "--host-cmd", "cat /sys/devices/system/cpu/online; grep -c ^processor /proc/cpuinfo",
        "--host-cmd", "cat /proc/cmdline",
        "--host-cmd", "grep 'System RAM' /proc/iomem",
        "--host-cmd", "exit 7",
    ]
    env = dict(os.environ, PYTHONPATH=str(SRC))
    # The testbed's QEMU dies with this child (PR_SET_PDEATHSIG) if the timeout kills it.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_python_runs_in_host(cli_result):
    c = cli_result["host_cmds"][0]
    assert c["exit_code"] == 0, c["output"]
    assert c["output"].startswith(str(SRC / "coreslice" / "__init__.py"))
    assert cli_result["host"]["python_exit_code"] == 0


def test_host_has_one_online_cpu(cli_result):
    out = cli_result["host_cmds"][1]["output"].split()
    assert out == ["0", "1"]
    assert cli_result["host"]["online_cpus"] == "0"


def test_mem_applied(cli_result):
    assert "mem=1G" in cli_result["host_cmds"][2]["output"].split()
    assert "maxcpus=1" in cli_result["host_cmds"][2]["output"].split()
    ram = cli_result["host_cmds"][3]["output"]
    # Usable RAM ends at mem= (1 GiB): nothing above 0x3fffffff is System RAM for the host.
    assert "00100000-3fffffff : System RAM" in ram
    assert all(int(line.split("-")[1].split()[0], 16) <= 0x3FFFFFFF for line in ram.splitlines())
    assert 700_000 < cli_result["host"]["mem_total_kib"] < 1_048_576


def test_host_facts_and_exit_codes(cli_result):
    h = cli_result["host"]
    assert cli_result["host_cmds"][4]["exit_code"] == 7
    assert h["apic_mode"] == "xapic"
    assert h["kernel_release"].startswith("6.12.")
    assert h["pci_serial"]["address"] == qemu.PCI_SERIAL_ADDRESS
    assert h["pci_serial"]["in_host"]["class"].startswith("0x0700")
    assert {"CAL", "RES", "TLB"} <= set(h["interrupts_before"]) and h["interrupts_after"]
    assert h["job_finished"] and h["error"] is None
    assert Path(h["console_log"]).read_text().count("CORESLICE-HOST job-end rc=0") == 1
    assert h["timings"]["qemu_to_job_start"] > 0
    assert cli_result["slices"] == []


def test_slice_initramfs_as_whole_machine(testbed_ready, tmp_path):
    k, _, slice_initrd = testbed_ready
    wb = qemu.boot_whole_machine(k.vmlinuz, slice_initrd, tmp_path, smp=2, memory="1G", timeout=150)
    assert wb.report is not None, wb.console_log.read_text()[-2000:]
    assert wb.report["cpus"] == 2 and wb.report["apic_ids"] == [0, 1]
    assert 900_000 < wb.report["mem_kib"] < 1_048_576
    assert wb.report["cmdline"].startswith("console=ttyS0")
    assert wb.seconds > 0
    assert not qemu.LIVE_PIDS
