"""testbed/audit.py: QEMU trace lines -> a slice's own and foreign device accesses."""

from pathlib import Path

import pytest

from coreslice.testbed import audit
from coreslice.testbed.topology import MachineConfig, build_command

PLAN = {
    "cpus": [{"cpu": 1, "apic_id": 1}, {"cpu": 2, "apic_id": 2}],
    "console": {"port": 0xE000, "pci_address": "0000:21:00.0", "pci_driver": "serial"},
    "pci": {
        "roots": [{
            "name": "0000:20",
            "io": [{"kind": "io", "start": 0xE000, "end": 0xEFFF}],
            "mem_below_4g": [{"kind": "mem", "start": 0xFE800000, "end": 0xFE9FFFFF}],
            "mem_above_4g": [{"kind": "mem", "start": 0xC040000000, "end": 0xC05FFFFFFF}],
        }],
        "mcfg": [{"base_address": 0xB0000000, "segment": 0, "start_bus": 0x20, "end_bus": 0x21}],
    },
}


def line(op: str, cpu: int, addr: int, name: str) -> str:
    return (f"memory_region_ops_{op} cpu {cpu} mr 0x55d0c0ffee00 addr {addr:#x} value 0x0 "
            f"size 1 name '{name}'")


def test_parse_line_reads_qemu_log_backend_format():
    a = audit.parse_line("memory_region_ops_write cpu 1 mr 0x55b10860d540 addr 0x4d0 value 0x8f "
                         "size 1 name 'elcr'")
    assert a == audit.Access(write=True, cpu=1, addr=0x4D0, size=1, region="elcr")
    assert audit.parse_line("memory_region_ops_read cpu -1 mr 0x1 addr 0xfee00000 value 0x0 size 4 "
                            "name 'apic-msi'").cpu == -1
    assert audit.parse_line("memory_region_sync_dirty mr 'pc.ram'") is None
    assert audit.parse_line("") is None


def test_own_ranges_from_the_plan():
    own = audit.owned_from_plan(PLAN)
    assert own.owns(0xE000) and own.owns(0xEFFF) and not own.owns(0xF000)  # its root's I/O window
    assert own.owns(0xFEE000B0)  # its local APIC (EOI)
    assert own.owns(0xB0000000 + (0x21 << 20) + 0xFFC)  # ECAM of its bus 0x21
    assert not own.owns(0xB0000000 + (0x22 << 20))  # the next bus is not its
    assert not own.owns(0xB0000000)  # bus 0
    assert not own.owns(0x3F8) and not own.owns(0xCF8) and not own.owns(0xFEC00000)
    # MSIs (a device emulated on the CPU's doorbell write): to its own CPUs 1 and 2 only.
    assert own.owns(0xFEE01000) and own.owns(0xFEE02000)
    assert not own.owns(0xFEE00000 | (3 << 12)) and not own.owns(0xFEE00000 | (0 << 12) | 0x1000 * 0x10)
    assert audit.describe(0xFEE03000) == "MSI to another CPU"


def test_isa_console_is_own_only_for_its_8_ports():
    own = audit.owned_from_plan({"cpus": [], "console": {"port": 0x2F8, "pci_address": None}})
    assert own.owns(0x2F8) and own.owns(0x2FF) and not own.owns(0x300) and not own.owns(0x3F8)


def test_summarize_splits_by_cpu_and_ownership():
    lines = [
        line("write", 1, 0xE000, "serial"),        # its console: own
        line("read", 2, 0xE005, "serial"),
        line("write", 1, 0x4D0, "elcr"),           # foreign
        line("write", 1, 0x4D0, "elcr"),
        line("read", 2, 0x3FD, "serial"),          # the host's console: foreign
        line("write", 0, 0x3F8, "serial"),         # the host's CPU: not this slice's
        line("write", 3, 0x80, "ioport80"),        # another slice's CPU
        line("read", 1, 0xB0000000 + 0x10, "pcie-mmcfg-mmio"),  # ECAM of bus 0: foreign
        "some other trace line",
    ]
    out = audit.summarize(lines, {0: ([1, 2], audit.owned_from_plan(PLAN)),
                                  1: ([3], audit.owned_from_plan({"cpus": []}))},
                          ecam=(0xB0000000, 0xC0000000))
    s0 = out[0]
    assert s0["accesses"] == 6
    assert {(e["region"], e["addr"]) for e in s0["own"]} == {("serial", 0xE000), ("serial", 0xE005)}
    foreign = {(e["region"], e["addr"]): e for e in s0["foreign"]}
    assert set(foreign) == {("elcr", 0x4D0), ("serial", 0x3FD), ("pcie-mmcfg-mmio", 0xB0000010)}
    assert foreign[("elcr", 0x4D0)]["writes"] == 2 and foreign[("elcr", 0x4D0)]["reads"] == 0
    assert s0["foreign"][0]["region"] == "elcr"  # most accessed first
    assert foreign[("serial", 0x3FD)]["what"] == "legacy UART COM1 (the host's console)"
    assert foreign[("pcie-mmcfg-mmio", 0xB0000010)]["what"] == "ECAM of bus 0x00"
    assert out[1]["foreign"] == [{"region": "ioport80", "addr": 0x80, "what": "port 0x80 (POST code, I/O delay)",
                                  "reads": 0, "writes": 1}]
    grouped = audit.foreign_by_what(s0)
    assert grouped["8259 ELCR (edge/level control)"] == {"reads": 0, "writes": 2}


def test_describe_names_the_reset_ports():
    assert "resets" in audit.describe(0xCF9)
    assert audit.describe(0xCF8) == "PCI configuration address"
    assert "resets" in audit.describe(0x64)
    assert audit.describe(0xFEC00010) == "IOAPIC"
    assert audit.describe(0x1234) == "I/O port" and audit.describe(0xF0000000) == "MMIO"


def test_cpu_indexes_are_apic_ids_on_a_flat_machine():
    assert audit.slice_cpu_indexes(PLAN, smp=4) == [1, 2]
    with pytest.raises(ValueError, match="flat -smp 2"):
        audit.slice_cpu_indexes(PLAN, smp=2)


def test_machine_opens_the_trace_file_without_events():
    cfg = MachineConfig(kernel=Path("/k"), append="", trace_file=Path("/run/trace.log"))
    cmd = build_command(cfg, Path("/run/con.log"), [])
    i = cmd.index("-trace")
    assert cmd[i + 1] == "file=/run/trace.log"
    assert "-trace" not in build_command(MachineConfig(kernel=Path("/k"), append=""), Path("/c"), [])
