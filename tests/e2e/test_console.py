"""End to end: `coreslice console` and `coreslice status` in the emulated host read a real
slice kernel's log from its RAM (VMCOREINFO, KASLR page tables, printk ring), with no UART:
the slice is booted with --console none."""

from __future__ import annotations

import json
import re

import pytest

from coreslice.testbed.run import python_for_host

from .test_slices import boot, run_dir  # noqa: F401  (run_dir is a fixture)

pytestmark = pytest.mark.e2e

LINE = re.compile(r"^\[ *\d+\.\d{6}\] ")


def test_console_and_status_read_the_log_from_the_slices_ram(run_dir, debian_kernel):  # noqa: F811
    python = python_for_host()[0]
    r = boot(run_dir, ["--cpus 1 --memory 512M@0x40000000 --console none"], host_cmds=[
        f"{python} -m coreslice console slice-1 --wait 'Run /init|Freeing unused kernel' --timeout 120",
        f"{python} -m coreslice status --json",
        f"{python} -m coreslice status slice-1",
    ])
    (s,) = r["slices"]
    assert s["exit_code"] == 0, s["stderr"]
    assert s["booted"], f"slice did not report; its log read from RAM: {s['console_log']}"
    plan = s["output"]["plan"]
    con, status, text = r["host_cmds"]

    # The boot log, as dmesg prints it, up to the first line that matched --wait.
    assert con["exit_code"] == 0, con["output"]
    lines = con["output"].splitlines()
    assert lines and all(LINE.match(ln) for ln in lines), lines[:5]
    assert "Linux version " + debian_kernel.release in con["output"]
    assert f"Command line: {plan['cmdline']}" in con["output"]
    assert re.search(r"Run /init|Freeing unused kernel", lines[-1]), lines[-1]

    # Its state: running, the kernel release from its VMCOREINFO, the last line it logged.
    assert status["exit_code"] == 0, status["output"]
    doc = json.loads(status["output"][status["output"].index("{"):])
    (st,) = doc["slices"]
    assert (st["name"], st["state"], st["reason"]) == ("slice-1", "running", None)
    assert st["kernel_release"] == debian_kernel.release
    assert st["cpus"] == [1] and st["memory"] == {"base": 0x40000000, "size": 512 << 20}
    assert st["uptime_s"] > 0 and st["last_log"]
    assert text["exit_code"] == 0 and re.search(r"^slice-1\s+running\s", text["output"], re.M), text["output"]
