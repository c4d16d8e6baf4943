"""Pure parts of `coreslice testbed run`: APIC mode, path checks, events, CLI contract."""

import argparse
import json
from pathlib import Path

import pytest

from coreslice.errors import UsageError
from coreslice.testbed import run
from coreslice.cli import testbed as cli


def test_apic_mode_from_msr_and_dmesg():
    assert run.apic_mode(0xFEE00D00, "") == "x2apic"
    assert run.apic_mode(0xFEE00900, "x2apic enabled") == "xapic"  # the MSR wins
    assert run.apic_mode(None, "[0.3] DMAR-IR: Enabled IRQ remapping in x2apic mode\n[0.3] x2apic enabled\n") == "x2apic"
    assert run.apic_mode(None, "[0.5] x2apic: IRQ remapping doesn't support X2APIC mode\n") == "xapic"
    assert run.apic_mode(None, "APIC: Switched APIC routing to: physical flat\n") == "xapic"
    assert run.apic_mode(None, "APIC: Switched APIC routing to: cluster x2apic\n") == "x2apic"
    assert run.apic_mode(None, "") == "unknown"


def test_parse_event():
    assert run._parse_event("boot-end 1 3 12.34") == ("boot-end", ["1", "3"], 12.34)
    assert run._parse_event("job-start 5.0") == ("job-start", [], 5.0)


def _parse(argv):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    cli.register(sub)
    return p.parse_args(argv)


def test_cli_defaults():
    a = _parse(["testbed", "run", "--slice", "--cpus 1", "--slice", "--cpus 2", "--host-cmd", "true"])
    assert a.slices == ["--cpus 1", "--cpus 2"]
    assert a.host_cmds == ["true"]
    assert (a.smp, a.memory, a.host_mem, a.cpu_model, a.x2apic, a.timeout, a.json) == (
        4, "6G", "1G", "max", False, 240.0, False)
    assert a.kernel_version is None
    assert a.func is cli.cmd_run


def test_cli_all_options():
    a = _parse(["testbed", "run", "--smp", "3", "--memory", "4G", "--host-mem", "512M",
                "--cpu-model", "max,-x2apic", "--x2apic", "--kernel-version", "6.12.95+deb12-amd64",
                "--timeout", "60", "--json", "--slice", "--cpus 1"])
    assert (a.smp, a.memory, a.host_mem, a.cpu_model, a.x2apic, a.kernel_version, a.timeout, a.json) == (
        3, "4G", "512M", "max,-x2apic", True, "6.12.95+deb12-amd64", 60.0, True)


def test_standalone_main_accepts_run_without_testbed(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--slice" in out and "default: 6G" in out and "default: 240" in out


def test_summary_and_exit_status():
    result = {
        "ok": False,
        "host": {"kernel_release": "r", "apic_mode": "xapic", "online_cpus": "0",
                 "mem_total_kib": 1, "timings": {}, "pci_serial": {"address": "0000:00:10.0", "in_host": None},
                 "run_dir": "/r", "error": None, "interrupts_before": {"CAL": 0}, "interrupts_after": {"CAL": 3}},
        "slices": [{"booted": False, "exit_code": 0, "console_log": "/r/c.log", "stderr": ""}],
        "host_cmds": [{"cmd": "true", "exit_code": 0, "output": "hi\n"}],
    }
    text = run.format_summary(result)
    assert "NO REPORT" in text and "CAL: 0 before slices, 3 after" in text and text.endswith("FAILED")
    assert run.exit_status(result) == 1
    assert run.exit_status({**result, "ok": True}) == 0


def test_collect_reads_run_dir(tmp_path):
    """The result dict is assembled from the files the job script leaves in the run dir."""
    from coreslice.testbed.job import complete_slice_args
    from coreslice.testbed.qemu import MachineConfig, QemuMachine

    m = QemuMachine(MachineConfig(kernel=Path("/k"), append=""), tmp_path)
    jobs = complete_slice_args(["--cpus 1", "--cpus 2"], Path("/k"), Path("/i"), m.serial_ports)
    states = [run._SliceState(j) for j in jobs]
    states[0].started, states[0].exit_code = 10.0, 0
    states[0].started_uptime, states[0].ended_uptime = 5.0, 5.5
    states[0].report, states[0].report_at = {"cpus": 1, "mem_kib": 9, "apic_ids": [1], "cmdline": "x"}, 17.25
    states[1].started, states[1].exit_code = 11.0, 2
    files = {
        "slice-0.stdout": '{"plan": 1}\n', "slice-0.stderr": "", "slice-1.stdout": "not json",
        "slice-1.stderr": "coreslice: error: bad\n",
        "hostcmd-0.out": "hi\n", "hostcmd-0.rc": "0\n",
        "python-check.txt": "coreslice /x\napic_base 0xfee00d00\n",
        "python-start.txt": "0 100.5 102.75\n",
        "host-release.txt": "6.12.95+deb12-amd64\n", "host-cpu-online.txt": "0\n",
        "host-meminfo.txt": "MemTotal:         988036 kB\n",
        "host-pci.txt": "0000:00:10.0 0x070002 0x1b36 0x0002 serial\n0000:00:01.0 0x000200 0x1af4 0x1009 virtio-pci\n",
        "interrupts-before.txt": "   CPU0\nCAL:  0  Function call interrupts\n",
        "interrupts-after.txt": "   CPU0\nCAL:  4  Function call interrupts\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    opts = run.RunOptions(host_cmds=["echo hi"])
    host = {"run_dir": str(tmp_path), "timings": {}, "error": None, "job_finished": True}
    r = run._collect(tmp_path, m, states, opts, host)
    h = r["host"]
    assert h["apic_mode"] == "x2apic" and h["apic_base_msr"] == "0xfee00d00"
    assert h["kernel_release"] == "6.12.95+deb12-amd64" and h["mem_total_kib"] == 988036
    assert h["interrupts_before"] == {"CAL": 0} and h["interrupts_after"] == {"CAL": 4}
    assert h["pci_serial"]["in_host"] == {"class": "0x070002", "vendor": "0x1b36", "device": "0x0002",
                                          "driver": "serial"}
    assert h["timings"]["python_start"] == 2.25
    s0, s1 = r["slices"]
    assert s0["output"] == {"plan": 1} and s0["stdout"] == '{"plan": 1}\n' and s0["booted"] and s0["seconds_to_userspace"] == 7.25
    assert s0["loader_seconds"] == 0.5 and s0["console"] == "com2"
    assert s1["output"] is None and s1["stdout"] == "not json" and not s1["booted"] and s1["exit_code"] == 2
    assert r["host_cmds"] == [{"cmd": "echo hi", "exit_code": 0, "output": "hi\n"}]
    assert r["ok"]  # slice 1's boot failed, so only slice 0 had to boot
    assert (tmp_path / "result.json").is_file()
    states[0].report = None
    assert not run._collect(tmp_path, m, states, opts, host)["ok"]


def test_pci_consoles_flag():
    assert _parse(["testbed", "run"]).pci_consoles is True
    assert _parse(["testbed", "run", "--isa-consoles"]).pci_consoles is False


# What the 6.12 host logged on the testbed with the pxb-pcie root buses (QEMU 10, SeaBIOS).
PXB_DMESG = """\
[    1.255072] PCI host bridge to bus 0000:00
[    1.255519] pci_bus 0000:00: root bus resource [io  0x0000-0x0cf7 window]
[    1.256015] pci_bus 0000:00: root bus resource [bus 00-1f]
[    1.387655] PCI host bridge to bus 0000:20
[    1.387697] pci_bus 0000:20: root bus resource [io  0xd000-0xdfff window]
[    1.387721] pci_bus 0000:20: root bus resource [mem 0xfe200000-0xfe3fffff window]
[    1.387769] pci_bus 0000:20: root bus resource [bus 20-21]
[    1.662826] pci_bus 0000:21: resource 0 [io  0xd000-0xdfff]
"""


def test_root_bus_resources_from_dmesg():
    r = run.root_bus_resources(PXB_DMESG)
    assert r == {"0000:00": ["io 0x0000-0x0cf7 window", "bus 00-1f"],
                 "0000:20": ["io 0xd000-0xdfff window", "mem 0xfe200000-0xfe3fffff window", "bus 20-21"]}


def test_collect_reports_each_pci_uart_with_its_root_bus(tmp_path):
    from coreslice.testbed.qemu import MachineConfig, QemuMachine

    m = QemuMachine(MachineConfig(kernel=Path("/k"), append=""), tmp_path)
    (tmp_path / "dmesg-start.txt").write_text(PXB_DMESG)
    (tmp_path / "host-pci.txt").write_text("0000:21:00.0 0x070002 0x1b36 0x0002 serial\n"
                                           "0000:20:00.0 0x060400 0x1b36 0x000c pcieport\n")
    host = {"run_dir": str(tmp_path), "timings": {}, "error": None, "job_finished": True,
            "serial_ports": [p.describe() for p in m.serial_ports]}
    h = run._collect(tmp_path, m, [], run.RunOptions(), host)["host"]
    ports = {p["name"]: p for p in h["serial_ports"]}
    assert ports["pxb1"]["in_host"]["driver"] == "serial"
    assert ports["pxb1"]["root_bus_resources"][0] == "io 0xd000-0xdfff window"
    assert ports["pxb2"]["in_host"] is None and ports["pxb2"]["root_bus_resources"] == []
    assert "in_host" not in ports["com2"]
    assert h["pci_serial"]["in_host"] is None  # 0000:00:10.0 is not in this host-pci.txt
    text = run.format_summary({"ok": True, "host": h, "slices": [], "host_cmds": []})
    assert "PCI UART 0000:21:00.0 on root bus 0000:20 (seen by the host" in text


def test_postmortem_saves_registers_and_the_named_lapics_then_releases_the_command(tmp_path):
    """A host command's `postmortem cyc 1 2`: every vCPU's registers and the named CPUs' local
    APIC state, read over the monitor, then the .done file that the command waits for."""
    from coreslice.testbed.tools import ToolError

    class Machine:
        def __init__(self):
            self.asked = []

        def hmp(self, command, timeout=10.0):
            self.asked.append(command)
            if command == "info lapic 2":
                raise ToolError("monitor gone")
            return f"<{command}>\n"

    m = Machine()
    run._save_postmortem(tmp_path, m, "cyc", ["1", "2", "x"])
    assert m.asked == ["info registers -a", "info lapic 1", "info lapic 2"]
    text = (tmp_path / "postmortem-cyc.txt").read_text()
    assert "<info registers -a>" in text and "<info lapic 1>" in text and "failed: monitor gone" in text
    assert (tmp_path / "postmortem-cyc.done").exists()
    # The shell side: the preamble defines the function every host command can call.
    from coreslice.testbed import job
    assert 'postmortem()' in job.HOSTCMD_PREAMBLE and 'postmortem-$1.done' in job.HOSTCMD_PREAMBLE


def test_a_timed_out_run_names_the_host_and_slice_apic_ids_for_its_postmortem(tmp_path):
    """On --timeout the run keeps every CPU's state; the APIC IDs come from the host's cpuinfo and
    the launched slices' plans (a slice that wrote no plan adds none)."""
    from types import SimpleNamespace

    (tmp_path / "host-cpuinfo.txt").write_text("processor\t: 0\napicid\t\t: 0\ninitial apicid\t: 0\n")
    (tmp_path / "slice-0.stdout").write_text(json.dumps({"plan": {"cpus": [{"apic_id": 2}, {"apic_id": 3}]}}))
    (tmp_path / "slice-1.stdout").write_text("")
    states = [SimpleNamespace(job=SimpleNamespace(index=0)), SimpleNamespace(job=SimpleNamespace(index=1))]
    assert run._apic_ids_in_use(tmp_path, states) == ["0", "2", "3"]


def test_bounded_passes_a_quick_commands_exit_code_and_explains_a_hung_one(tmp_path):
    """`bounded LABEL S CMD`: a command that ends in time gives its own exit code and output; one
    still running after S seconds leaves its threads' stacks, an event, Python's traceback (SIGABRT
    with PYTHONFAULTHANDLER) on its stderr, asks for a postmortem, and returns 124."""
    import shutil
    import subprocess
    import sys

    from coreslice.testbed import job

    sh = shutil.which("dash") or shutil.which("sh")
    (tmp_path / "postmortem-slow.done").write_text("")  # the outside's answer, given in advance
    script = job.HOSTCMD_PREAMBLE + (
        "bounded quick 20 sh -c 'echo out; exit 3' > quick.out; echo $? > quick.rc\n"
        f"bounded slow 1 {sys.executable} -c 'import time; time.sleep(60)' 2> slow.err; echo $? > slow.rc\n")
    subprocess.run([sh, "-c", script], cwd=tmp_path, env={"RUN": str(tmp_path), "PATH": "/usr/bin:/bin"},
                   check=True, timeout=60)
    assert (tmp_path / "quick.rc").read_text().strip() == "3"
    assert (tmp_path / "quick.out").read_text() == "out\n"
    assert not (tmp_path / "bounded-quick.txt").exists()
    assert (tmp_path / "slow.rc").read_text().strip() == "124"
    assert "still running after 1 s" in (tmp_path / "bounded-slow.txt").read_text()
    assert "Fatal Python error: Aborted" in (tmp_path / "slow.err").read_text()
    events = [e.split() for e in (tmp_path / "events").read_text().splitlines()]
    assert [e[:3] for e in events] == [["bounded", "slow", "timeout"], ["postmortem", "slow", events[1][2]]]
