"""End to end: what the slices' CPUs touch (issue 12 sections 1, 2 and 4), from QEMU's trace.

`coreslice testbed run --audit` records every device access of each slice's CPUs from its boot to
10 s of steady running.  Two slices, each with its PCI UART, a whole NVMe controller and a whole
e1000e NIC on its own root bus; the second writes one byte to port 0x80 from its init
(coreslice.poke), which the audit must report, and the first does not.
"""

from __future__ import annotations

import pytest

from coreslice.testbed import audit
from coreslice.testbed.run import RunOptions, run

pytestmark = pytest.mark.e2e


def test_audit_finds_only_the_named_residue_and_the_deliberate_poke(testbed_ready, run_dir):
    result = run(RunOptions(
        slices=["--cpus 1-2 --memory 512M", "--cpus 3 --memory 256M --cmdline coreslice.poke=0x80"],
        storage=True, network=True, audit=True, workdir=run_dir))
    host = result["host"]
    assert host.get("error") is None, host
    assert result["ok"], [(s["booted"], s["console_log"]) for s in result["slices"]]
    quiet, poker = (s["audit"] for s in result["slices"])
    for a, cpus in ((quiet, [1, 2]), (poker, [3])):
        assert a["cpus"] == cpus
        own = {e["region"] for e in a["own"]}
        # Its console, NVMe and NIC registers, its buses' ECAM and its local APICs are its own.
        assert {"serial", "nvme", "e1000e-mmio", "pcie-mmcfg-mmio", "apic-msi"} <= own, own
        grouped = audit.foreign_by_what(a)
        unnamed = set(grouped) - set(audit.STOCK_KERNEL_RESIDUE) - {"port 0x80 (POST code, I/O delay)"}
        assert not unnamed, {w: grouped[w] for w in unnamed}
        # Closed by the command line (reserve=, pci=noearly): legacy UARTs, Super I/O, the
        # configuration mechanism beyond one boot-time read, the reset ports.
        assert not [e for e in a["foreign"] if e["addr"] in range(0x2E8, 0x400)]
        assert not [e for e in a["foreign"] if e["addr"] in (0x2E, 0x2F, 0x4E, 0x4F, 0x64, 0xCF9)]
        conf = [e for e in a["foreign"] if e["addr"] in range(0xCF8, 0xD00)]
        assert sum(e["reads"] + e["writes"] for e in conf) <= 2, conf
    poke = [e for e in poker["foreign"] if e["addr"] == 0x80]
    assert poke and poke[0]["writes"] >= 1, poker["foreign"]
    assert not [e for e in quiet["foreign"] if e["addr"] == 0x80], quiet["foreign"]
    # And no IPI from either slice reached the host's CPU (function call, reschedule, TLB
    # shootdown), from before the first boot to after the steady window.
    before, after = host["interrupts_before"], host["interrupts_after"]
    for row in ("CAL", "RES", "TLB"):
        assert after[row] == before[row], f"host {row} IPIs went {before[row]} -> {after[row]}"
