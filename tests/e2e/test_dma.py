"""End to end: where a slice's PCI function can DMA (issue 12 section 3), without and with the
host's IOMMU.

`coreslice testbed run --storage --network --dma-probe` gives one 2-CPU slice, on its own pxb
root bus, an NVMe controller, a NIC and QEMU's edu DMA engine (testbed/dmaprobe.py).  The
slice's init makes the edu copy 64 bytes of the slice's own RAM and 64 bytes of host physical
address 0 (the host's real-mode IVT) into the slice's RAM and compares with what its CPU reads.
Without an IOMMU both copies succeed: the host's bytes leak, which is what the IOMMU must change.
With --iommu (intel-iommu, the host on intel_iommu=on intremap=off, `coreslice boot` holding the
slice's RAM mapped at IOVA = physical address for its functions through VFIO) the own copy and
the slice's NVMe and NIC still work, the host read is blocked and the host kernel logs a DMAR
fault for the slice's edu at address 0.  A host command then restarts the slice (its holder
released after the functions went quiet, a new one built before the INIT), waits for the new
kernel's report to show the same outcome, and stops it: no holder left, every function unbound
with driver_override ``coreslice``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coreslice.testbed import datapath
from coreslice.testbed.run import RunOptions, run

pytestmark = pytest.mark.e2e

SLICE = "--cpus 1-2 --memory 512M"
EDU = "0000:24:00.0"  # pxb1: root bus 0x20, root port 20:03.0 after the NVMe's and NIC's
FUNCTIONS = ("0000:21:00.0", "0000:22:00.0", "0000:23:00.0", EDU)  # UART, NVMe, NIC, edu
STEP_S = 300
# The restarted slice's report: its disk read and written, its ping answered, DMA as before.
AGAIN = ("storage_read=coreslice-disk-pxb1-ok storage_written=1 ping_ok=1 rtt_ms=[0-9.]+ "
         "dma_own=1 dma_host=blocked")
RESTART = "\n".join([
    "coreslice status dma --json > status.json 2>&1",
    f"bounded restart {STEP_S} coreslice restart dma --json > restart.json 2> restart.err; echo $? > restart.rc",
    f"bounded console {STEP_S} coreslice console dma --wait '{AGAIN}' --timeout 240 > console-again.txt 2>&1;"
    " echo $? > console-again.rc",
    f"bounded stop {STEP_S} coreslice stop dma --json > stop.json 2> stop.err; echo $? > stop.rc",
    "ls /run/coreslice/dma > dma-left.txt 2>&1",
    f"for f in {' '.join(FUNCTIONS)}; do d=/sys/bus/pci/devices/$f;"
    ' echo "$f $(cat $d/driver_override) $(basename "$(readlink $d/driver)")"; done > after-stop.txt',
])


def _run(run_dir, iommu: bool, **kw) -> tuple[dict, dict]:
    result = run(RunOptions(slices=[SLICE + (" --name dma" if iommu else "")], storage=True, network=True,
                            dma_probe=True, iommu=iommu, timeout=1500.0 if iommu else 600.0, workdir=run_dir, **kw))
    host = result["host"]
    assert host.get("error") is None, host
    assert host["iommu"] is iommu
    (s,) = result["slices"]
    assert s["exit_code"] == 0, s["stderr"]
    assert s["booted"], f"no report; console: {s['console_log']}"
    assert EDU in s["pci"], (s["pci"], s["console_log"])
    assert s["dma"]["edu"] == EDU and s["dma"]["host_addr"] == "0x0"
    return result, s


def _data_ok(result: dict, s: dict) -> None:
    log = s["console_log"]
    assert s["storage"]["read"] == datapath.known_content("pxb1"), log
    assert s["storage"]["written"] is True, log
    assert s["network"]["ping_ok"] is True, log
    assert result["host"]["data"]["disk"]["ok"] and result["host"]["data"]["network"]["ping_ok"]


def test_without_iommu_the_slice_device_reads_host_memory(testbed_ready, run_dir):
    result, s = _run(run_dir, iommu=False)
    assert "intel_iommu=on" not in result["host"]["cmdline"]
    dma = s["dma"]
    assert dma["own_ok"] is True, s["console_log"]
    assert dma["host_blocked"] is False, s["console_log"]  # the host's bytes reached the slice
    assert dma["fault_logged"] is False and dma["faults"] == []
    _data_ok(result, s)
    assert result["dma_ok"] and result["ok"]


def test_with_iommu_the_slice_device_reaches_only_its_own_ram(testbed_ready, run_dir):
    result, s = _run(run_dir, iommu=True, host_cmds=[RESTART])
    assert {"intel_iommu=on", "intremap=off"} <= set(result["host"]["cmdline"].split())
    dma = s["dma"]
    assert dma["host_blocked"] is True, s["console_log"]
    assert dma["fault_logged"] is True, (dma["faults"], result["host"]["console_log"])
    assert dma["own_ok"] is True, (dma["faults"], s["console_log"])
    _data_ok(result, s)
    assert result["dma_ok"] and result["ok"]
    # Restart and stop of a slice holding functions, with its DMA domain.
    d = Path(result["host"]["run_dir"])
    out = result["host_cmds"][0]
    assert out["exit_code"] == 0, out["output"]
    status = json.loads((d / "status.json").read_text())["slices"][0]
    assert status["dma"]["confined"] is True and sorted(status["dma"]["functions"]) == sorted(FUNCTIONS), status

    def rc(name: str) -> int:
        return int((d / name).read_text().strip())
    assert rc("restart.rc") == 0, (d / "restart.err").read_text()
    again = json.loads((d / "restart.json").read_text())
    assert again["dma"]["confined"] and again["dma"]["iova"]["size"] == 512 << 20, again["dma"]
    assert rc("console-again.rc") == 0, (d / "console-again.txt").read_text()[-3000:]
    assert rc("stop.rc") == 0, (d / "stop.err").read_text()
    assert json.loads((d / "stop.json").read_text())["dma"].startswith("DMA domain released")
    assert (d / "dma-left.txt").read_text().split() == []
    rows = [line.split() for line in (d / "after-stop.txt").read_text().splitlines()]
    assert rows == [[fn, "coreslice"] for fn in FUNCTIONS], rows  # unbound, no host driver may bind
