"""NUMA discovery: the SRAT layouts (built and captured), node numbering, CPUs and free RAM per node."""

from __future__ import annotations

from pathlib import Path

import pytest

from coreslice.acpi.tables import (
    AcpiTableError,
    Srat,
    SratCpu,
    SratMemory,
    SratFixed,
    build_srat,
    checksum,
    parse_srat,
    seal,
)
from coreslice.host import numa
from coreslice.host.memory import Range
from coreslice.host.snapshot import discover

from ..hosttree import make_host_tree, two_node_srat

GIB = 1 << 30
QEMU_NUMA2 = Path(__file__).parents[2] / "fixtures/hosts/qemu-q35-numa2"


def test_layout_sizes_match_acpi_6_5():
    from coreslice.acpi import tables as t
    assert (SratFixed.size(), t.SratLocalApic.size(), t.SratMemoryAffinity.size(), t.SratLocalX2Apic.size()) == \
        (48, 16, 40, 24)
    assert t.SratLocalApic.apic_id.offset == 3 and t.SratLocalApic.proximity_domain_hi.offset == 9
    assert t.SratMemoryAffinity.base_address.offset == 8 and t.SratMemoryAffinity.flags.offset == 28
    assert t.SratLocalX2Apic.x2apic_id.offset == 8


def test_build_and_parse_round_trip():
    srat = Srat(
        cpus=[SratCpu(0, 0, True, "lapic"), SratCpu(0x123456, 7, True, "lapic"),  # 32-bit domain split 8+24
              SratCpu(2, 0x1000, True, "x2apic"), SratCpu(3, 9, False, "lapic")],
        memory=[SratMemory(0, 0, 0xA0000, True), SratMemory(2, 1 << 40, 64 * GIB, True, hot_pluggable=True),
                SratMemory(3, 2 << 40, GIB, False, non_volatile=True)])
    raw = build_srat(srat)
    assert raw[:4] == b"SRAT" and checksum(raw) == 0 and len(raw) == 48 + 3 * 16 + 24 + 3 * 40
    assert parse_srat(raw) == srat


def test_captured_qemu_srat():
    """The SRAT QEMU 10 wrote for -numa node,cpus=0-1 (3G) and cpus=2-3 (3G), read from /sys."""
    s = parse_srat((QEMU_NUMA2 / "sys/firmware/acpi/tables/SRAT").read_bytes())
    assert [(c.apic_id, c.proximity_domain, c.kind) for c in s.cpus] == \
        [(0, 0, "lapic"), (1, 0, "lapic"), (2, 1, "lapic"), (3, 1, "lapic")]
    assert [(m.proximity_domain, m.base, m.end) for m in s.memory] == [
        (0, 0, 0xA0000), (0, 0x100000, 0x80000000), (0, 0x100000000, 0x140000000), (1, 0x140000000, 0x200000000)]
    assert all(m.enabled and not m.hot_pluggable for m in s.memory)


def test_unknown_entry_types_are_skipped_and_bad_lengths_refused():
    good = build_srat(Srat([SratCpu(0, 1, True, "lapic")], []))
    gicc = bytes([3, 18]) + bytes(16)  # a type-3 (GICC) entry: not ours, skipped
    assert parse_srat(seal(good + gicc)).cpus == [SratCpu(0, 1, True, "lapic")]
    with pytest.raises(AcpiTableError, match="bad length"):
        parse_srat(seal(good + bytes([1, 0])))
    with pytest.raises(AcpiTableError, match="needs 40"):
        parse_srat(seal(good + bytes([1, 16]) + bytes(14)))
    with pytest.raises(AcpiTableError, match="expected a SRAT"):
        parse_srat(b"APIC" + good[4:])


def test_nodes_numbered_by_first_appearance_like_linux():
    """Proximity domains 7 and 3 become nodes 0 and 1 (processor entries first, in table order);
    a domain seen only in memory entries comes after; disabled entries count for nothing."""
    srat = Srat(cpus=[SratCpu(7, 0, True, "lapic"), SratCpu(3, 1, True, "lapic"), SratCpu(9, 2, False, "lapic")],
                memory=[SratMemory(5, 0, GIB, True), SratMemory(3, GIB, GIB, True), SratMemory(11, 0, 1, False)])
    assert numa.proximity_nodes(srat) == {7: 0, 3: 1, 5: 2}
    assert numa.apic_nodes(srat) == {0: 0, 1: 1}
    assert numa.apic_nodes(None) is None


def test_no_srat_is_one_node_with_everything(tmp_path):
    h = discover(make_host_tree(tmp_path))
    assert all(c.node == 0 for c in h.cpus)
    (n,) = h.numa
    assert (n.node, n.proximity_domain, n.cpus, n.apic_ids) == (0, None, (0, 1, 2, 3), (0, 1, 2, 3))
    assert list(n.memory) == h.firmware_ram()
    # Free: firmware RAM minus the host's System RAM (up to 1G) and the low 1 MiB.
    assert [(r.start, r.end) for r in n.free] == [(0x40000000, 0x7FFDF000), (0x100000000, 0x280000000)]


def test_two_node_synthetic_host(tmp_path):
    h = discover(make_host_tree(tmp_path, ncpus=6, srat=two_node_srat(6)))
    assert [c.node for c in h.cpus] == [0, 0, 0, 1, 1, 1]
    a, b = h.numa
    assert a.cpus == (0, 1, 2) and b.cpus == (3, 4, 5)
    assert [(r.start, r.end) for r in a.memory] == [(0, 0x9FC00), (0x100000, 0x7FFDF000), (0x100000000, 0x180000000)]
    assert [(r.start, r.end) for r in a.free] == [(0x40000000, 0x7FFDF000), (0x100000000, 0x180000000)]
    assert [(r.start, r.end) for r in b.free] == [(0x180000000, 0x280000000)]
    doc = h.to_json()["numa"]
    assert doc[1]["free_bytes"] == 4 * GIB and doc[0]["cpus"] == [0, 1, 2]


def test_cpu_missing_from_srat_has_no_node(tmp_path):
    srat = two_node_srat(4)
    srat = Srat([c for c in srat.cpus if c.apic_id != 3], srat.memory)
    h = discover(make_host_tree(tmp_path, srat=srat))
    assert h.cpus[3].node is None
    assert 3 not in h.numa[0].cpus + h.numa[1].cpus
    assert h.cpus[3].to_json()["node"] is None


def test_captured_numa_host():
    """The real two-node tree: CPUs and free RAM per node as the host kernel itself saw them."""
    h = discover(QEMU_NUMA2)
    assert [(c.cpu, c.apic_id, c.node, c.online) for c in h.cpus] == [
        (0, 0, 0, True), (1, 1, 0, False), (2, 2, 1, False), (3, 3, 1, False)]
    # (The host kernel agreed when captured: cpu0-1/node0, cpu2-3/node1; see the fixture's README.)
    a, b = h.numa
    assert [(r.start, r.end) for r in a.free] == [(0x40000000, 0x7FFE0000), (0x100000000, 0x140000000)]
    assert [(r.start, r.end) for r in b.free] == [(0x140000000, 0x200000000)]
    assert b.proximity_domain == 1 and b.cpus == (2, 3)


def test_subtract_and_intersect():
    from coreslice.host.memory import intersect, subtract
    r = [Range(0, 100, "System RAM")]
    assert subtract(r, [Range(10, 20), Range(50, 200)]) == [Range(0, 10, "System RAM"), Range(20, 50, "System RAM")]
    assert intersect([Range(0, 100), Range(200, 300)], [Range(50, 250)]) == [Range(50, 100), Range(200, 250)]
