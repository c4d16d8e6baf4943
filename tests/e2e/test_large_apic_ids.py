"""End to end on a 260-CPU x2APIC emulated machine: CPUs with APIC IDs above 255.

The emulator is kinder than a large server in one way only here (its APIC IDs are dense, 0-259);
what matters is real: an MSI without interrupt remapping names 8 bits of APIC ID.

- A slice on CPU 258 (APIC ID 258) whose only PCI function is its console UART boots in x2APIC
  mode (x2APIC survives INIT), and its kernel composes no MSI: with `pcie_ports=compat` the root
  port of its root bus gets no port services (before that change, pcieport enabled MSI-X there
  and the kernel warned in __irq_msi_compose_msg: the interrupt would reach APIC ID 2).
- A slice on CPU 257 given a device is refused before anything is written, with the reason.

One boot of a 260-CPU machine: about 3 minutes under TCG (SeaBIOS starts every CPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_slices import boot, check_matches_plan, run_dir  # noqa: F401  (run_dir is a fixture)

pytestmark = pytest.mark.e2e


def test_cpus_above_apic_id_255(run_dir):  # noqa: F811
    r = boot(run_dir, [
        "--cpus 258 --memory 512M@0x40000000",
        "--cpus 257 --memory 512M@0x100000000 --console io:0x2f8 --device 0000:41:00.0",
    ], smp=260, x2apic=True, timeout=480, slice_timeout=240)
    assert r["host"]["apic_mode"] == "x2apic"
    high, refused = r["slices"]
    check_matches_plan(high)
    assert high["apic_ids"] == [258]
    assert "pcie_ports=compat" in high["cmdline"].split()
    log = Path(high["console_log"]).read_text(errors="replace")
    assert "__irq_msi_compose_msg" not in log, "the slice composed an MSI its CPU's APIC ID does not fit"
    assert refused["exit_code"] == 2 and not refused["booted"]
    assert "CPUs 257 (APIC ID 257) have APIC IDs above 255" in refused["stderr"]
    assert refused["stderr"].strip().count("\n") == 0
