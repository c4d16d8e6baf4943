"""End to end: the real `coreslice boot`, inside the emulated host, boots real slices.

Each test boots QEMU (q35, TCG) with a stock Debian kernel as the host (maxcpus=1 mem=1G), runs
`coreslice boot` there for each slice, and checks what the slices report from their own user
space against the plan that `coreslice boot --json` printed.  The testbed stops QEMU by its PID in
a `finally`, whatever happens; console logs stay in the run directory for the post-mortem.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from coreslice.testbed.run import RunOptions, run

pytestmark = pytest.mark.e2e

E820_LINE = re.compile(r"BIOS-e820: \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\] (\w+)")


def boot(tmp_run_dir, slices, **kw) -> dict:
    result = run(RunOptions(slices=slices, workdir=tmp_run_dir, **kw))
    assert result["host"].get("error") is None, f"host failed: {result['host']}"
    return result


@pytest.fixture
def run_dir(tmp_path_factory, request):
    # Not under /tmp: the emulated host mounts its own tmpfs there (see testbed.run).
    from coreslice.testbed.paths import cache_dir
    import os
    import time
    d = cache_dir() / "test-runs" / f"{request.node.name}-{time.strftime('%H%M%S')}-{os.getpid()}"
    return d


def check_matches_plan(s: dict) -> None:
    """What the slice reports equals what coreslice planned for it."""
    assert s["exit_code"] == 0, s["stderr"]
    plan = s["output"]["plan"]
    assert s["booted"], f"slice did not reach user space; console: {s['console_log']}"
    assert s["cpus"] == len(plan["cpus"])
    assert s["apic_ids"] == [c["apic_id"] for c in plan["cpus"]]
    assert s["cmdline"] == plan["cmdline"]
    # The memory map the slice kernel printed is exactly the plan's e820.
    log = Path(s["console_log"]).read_text(errors="replace")
    seen = [(int(a, 16), int(b, 16) + 1 - int(a, 16), t) for a, b, t in E820_LINE.findall(log)]
    want = [(e["addr"], e["size"], {"ram": "usable"}.get(e["type"], e["type"])) for e in plan["e820"]]
    assert seen == want
    # Independently of the plan's e820 list: the loader's data (zero page, command line, ACPI
    # tables, from layout.data_addr to the top of the range) is reserved in the slice's own view,
    # so its kernel (KASLR included) never reuses it.
    top = plan["memory"]["base"] + plan["memory"]["size"]
    data = plan["layout"]["data_addr"]
    assert any(t == "reserved" and a <= data and a + n >= top for a, n, t in seen), (hex(data), seen)
    assert not any(t == "usable" and a < top and a + n > data for a, n, t in seen)
    ram = sum(e["size"] for e in plan["e820"] if e["type"] == "ram")
    # PCI: the slice's sysfs holds functions of its own root buses only (none with pci=off).
    buses = [(r["bus_start"], r["bus_end"]) for r in (plan.get("pci") or {}).get("roots", [])]
    for fn in s["pci"]:
        bus = int(fn.split(":")[1], 16)
        assert any(lo <= bus <= hi for lo, hi in buses), f"{fn} is not on the slice's root buses {buses}"
    if plan["console"]["pci_address"]:
        assert plan["console"]["pci_address"] in s["pci"]
    else:
        assert s["pci"] == []
    # MemTotal is the RAM it was given minus the kernel's own image and reservations.
    assert ram * 0.80 / 1024 < s["mem_kib"] <= ram / 1024


def test_one_slice_with_two_cpus(run_dir):
    r = boot(run_dir, ["--cpus 1-2 --memory 512M@0x40000000"])
    assert r["host"]["apic_mode"] == "xapic"
    (s,) = r["slices"]
    check_matches_plan(s)
    assert s["apic_ids"] == [1, 2]
    plan = s["output"]["plan"]
    assert plan["memory"] == {"base": 0x40000000, "size": 512 << 20}
    assert "nokaslr" not in s["cmdline"]  # KASLR stays on (checked in the two-slice test)


def test_two_slices_at_once_and_isolation(run_dir):
    r = boot(run_dir, [
        "--cpus 1-2 --memory 512M@0x40000000",
        "--cpus 3 --memory 1G@0x100000000",
        # CPU 2 now belongs to the first slice: refused before any write, exit 2.
        "--cpus 2 --memory 256M@0x140000000",
    ], host_cmds=["cat /proc/interrupts"])
    a, b, bad = r["slices"]
    check_matches_plan(a)
    check_matches_plan(b)
    assert a["apic_ids"] == [1, 2] and b["apic_ids"] == [3]
    assert b["output"]["plan"]["memory"]["base"] == 0x100000000
    # KASLR is on: the kernels run inside their own RAM but not where the loader put them
    # (physical randomisation picks one of hundreds of 2 MiB slots, so both staying put would
    # be a 1-in-10^4 chance, not a flake to retry).
    for s in (a, b):
        p = s["output"]["plan"]
        assert p["memory"]["base"] <= s["kernel_code"] < p["memory"]["base"] + p["memory"]["size"]
    assert any(s["kernel_code"] != s["output"]["plan"]["layout"]["load_addr"] for s in (a, b))
    assert a["output"]["plan"]["low_slot"]["base"] != b["output"]["plan"]["low_slot"]["base"]
    assert bad["exit_code"] == 2 and not bad["booted"]
    # Named by the ledger ("CPU 2 is held by slice 'slice-1' ..."); without it, by the slot record.
    assert "held by slice 'slice-1'" in bad["stderr"] and bad["stderr"].strip().count("\n") == 0

    # Isolation: no IPI reached the host's CPU while the slices booted and ran.
    before, after = r["host"]["interrupts_before"], r["host"]["interrupts_after"]
    for row in ("CAL", "RES", "TLB"):
        assert after[row] == before[row], f"host {row} IPIs went {before[row]} -> {after[row]}"
    # Nothing a slice printed reached the host console.
    host_log = Path(r["host"]["console_log"]).read_text(errors="replace")
    assert "CORESLICE-REPORT" not in host_log
    assert "console=uart,io" not in host_log
    assert r["host_cmds"][0]["exit_code"] == 0 and "CAL" in r["host_cmds"][0]["output"]


def test_x2apic_host_and_pci_uart_console(run_dir):
    """A PCI UART on a root bus of its own (pxb-pcie 0000:20) is the console: the slice's DSDT
    lists that root alone, its ECAM is reserved in the slice's e820, and the slice's kernel scans
    that root and nothing of the host's.  The bus-0 UART is refused: its root holds the host's
    virtio functions."""
    r = boot(run_dir, [
        "--cpus 1 --memory 512M@0x40000000 --console io:0x2f8",
        "--cpus 3 --memory 256M@0x140000000 --console 0000:00:10.0",  # refused, nothing taken
        "--cpus 2-3 --memory 1G@0x100000000 --console 0000:21:00.0",
    ], x2apic=True, host_cmds=[
        # A probe of every driver (as a rescan, udev or a later modprobe would do) leaves the
        # slice's UART alone: its driver_override names no driver (machine/pci.py OVERRIDE).
        "d=/sys/bus/pci/devices/0000:21:00.0; cat $d/driver_override; echo 0000:21:00.0 > /sys/bus/pci/drivers_probe;"
        " echo rc=$?; [ -e $d/driver ] && echo bound=$(basename $(readlink $d/driver)) || echo unbound",
    ])
    assert r["host"]["apic_mode"] == "x2apic"
    probe = r["host_cmds"][0]["output"].split()
    assert probe[0] == "coreslice" and probe[-1] == "unbound", probe
    a, bus0, b = r["slices"]
    for s in (a, b):
        check_matches_plan(s)
        assert s["output"]["plan"]["apic_mode"] == "x2apic"
    plan = b["output"]["plan"]
    assert plan["console"]["pci_address"] == "0000:21:00.0"
    assert b["output"]["console_detached_from"] == "serial"
    assert b["console_log"].endswith("console-pxb1.log")
    assert [root["name"] for root in plan["pci"]["roots"]] == ["0000:20"]
    assert "pci=off" not in plan["cmdline"] and "pci=nobios,norom,nobar,realloc=off,lastbus=0x100" in plan["cmdline"]
    log = Path(b["console_log"]).read_text(errors="replace")
    # ECAM accepted late (pci=noearly), vouched for by the slice's EFI map (boot/efi.py).
    assert "for domain 0000 [bus 20-21]" in log and "is EfiMemoryMappedIO; assuming valid" in log
    assert re.findall(r"PCI host bridge to bus (\S+)", log) == ["0000:20"]
    assert set(re.findall(r"pci (\w{4}:\w\w:\w\w\.\d): \[", log)) == {"0000:20:00.0", "0000:21:00.0"}
    # The slice's own sysfs, read by its init: its root port and its UART, nothing of the host's.
    assert b["pci"] == ["0000:20:00.0", "0000:21:00.0"]
    assert a["pci"] == []  # pci=off: no PCI at all
    assert bus0["exit_code"] == 2 and "also holds 0000:00:01.0 (virtio-pci)" in bus0["stderr"]
