"""Placement on synthetic hosts: one node, two nodes, full nodes, relaunch by name."""

from __future__ import annotations

import pytest

from coreslice.boot.lowmem import SlotRecord
from coreslice.errors import UsageError
from coreslice.host.memory import Range
from coreslice.host.snapshot import discover
from coreslice.ledger import SliceRecord
from coreslice.plan.placement import Held, Request, fit_memory, free_resources, held_resources, place

from ..hosttree import BOOT_ID, make_host_tree, two_node_srat

GIB = 1 << 30
MIB = 1 << 20


@pytest.fixture
def one(tmp_path):
    """No SRAT: node 0, CPUs 1-3 free, RAM free at 1G-0x7ffdf000 and 4G-10G."""
    return discover(make_host_tree(tmp_path / "one"))


@pytest.fixture
def two(tmp_path):
    """Node 0: CPUs 0-2, free 1G-2G and 4G-6G; node 1: CPUs 3-5, free 6G-10G."""
    return discover(make_host_tree(tmp_path / "two", ncpus=6, srat=two_node_srat(6)))


def held(name, cpus, base, size):
    return Held(name, frozenset(cpus), Range(base, base + size))


def test_lowest_cpus_and_1g_aligned_memory(one):
    p = place(one, Request(512 * MIB, ncpus=2))
    assert (p.node, p.cpus, p.apic_ids, p.mem_base, p.mem_size) == (0, [1, 2], [1, 2], GIB, 512 * MIB)
    assert p.to_json()["memory"] == {"base": GIB, "size": 512 * MIB}


def test_second_slice_avoids_the_first_and_keeps_1g_alignment(one):
    first = place(one, Request(512 * MIB, ncpus=2))
    p = place(one, Request(512 * MIB, ncpus=1), [held("a", first.cpus, first.mem_base, first.mem_size)])
    # 1.5G is free right after the first slice, but 4G is the lowest 1 GiB-aligned base that fits.
    assert (p.cpus, p.mem_base) == ([3], 4 * GIB)


def test_2m_alignment_when_1g_does_not_fit(one):
    # Everything above 4G taken: only 1G-0x7ffdf000 is left, and 1G is taken by another slice.
    taken = [held("a", [1], GIB, 300 * MIB), held("b", [2], 4 * GIB, 6 * GIB)]
    p = place(one, Request(512 * MIB, ncpus=1), taken)
    assert p.mem_base == GIB + 300 * MIB  # 2 MiB aligned, the lowest that fits
    assert fit_memory([Range(GIB + 1, 2 * GIB)], 512 * MIB) == GIB + 2 * MIB


def test_cpus_and_memory_from_one_node(two):
    assert place(two, Request(GIB, ncpus=2)).cpus == [1, 2]
    # Node 0 has only CPUs 1-2 to give: three CPUs come from node 1, and so does the memory.
    p = place(two, Request(GIB, ncpus=3))
    assert (p.node, p.cpus, p.mem_base) == (1, [3, 4, 5], 6 * GIB)
    # Node 0's memory is not enough for 3G (1G-2G, 4G-6G): node 1 it is.
    p = place(two, Request(3 * GIB, ncpus=1))
    assert (p.node, p.cpus, p.mem_base) == (1, [3], 6 * GIB)


def test_numa_node_option(two):
    p = place(two, Request(512 * MIB, ncpus=1, node=1))
    assert (p.node, p.cpus, p.mem_base) == (1, [3], 6 * GIB)
    with pytest.raises(UsageError, match=r"NUMA node 2 does not exist on this host \(nodes: 0, 1\)"):
        place(two, Request(512 * MIB, ncpus=1, node=2))
    with pytest.raises(UsageError, match="not on --numa-node 1"):
        place(two, Request(512 * MIB, cpus=(1,), node=1))


def test_explicit_cpus_get_memory_on_their_node(two):
    p = place(two, Request(GIB, cpus=(4,)))
    assert (p.node, p.cpus, p.mem_base) == (1, [4], 6 * GIB)
    # Explicit memory, CPUs picked on its node.
    p = place(two, Request(GIB, ncpus=1, mem_base=7 * GIB))
    assert (p.node, p.cpus, p.mem_base) == (1, [3], 7 * GIB)


def test_nothing_fits_says_what_is_free(two):
    taken = [held("a", [1, 2], GIB, 512 * MIB), held("b", [3, 4], 6 * GIB, 512 * MIB)]
    with pytest.raises(UsageError) as e:
        place(two, Request(512 * MIB, ncpus=2), taken)
    msg = str(e.value)
    assert msg.startswith("no NUMA node has room for 2 CPUs and 512M of memory")
    assert "node 0: CPUs none, largest memory range 2G at 0x100000000" in msg
    assert "node 1: CPUs 5, largest memory range 3584M at 0x1a0000000" in msg
    assert "\n" not in msg and "; ask for fewer CPUs" in msg
    with pytest.raises(UsageError, match=r"^NUMA node 1 has no room for 1 CPU and 8G of memory \(free: node 1"):
        place(two, Request(8 * GIB, ncpus=1, node=1), taken)


def test_the_hosts_cpus_are_never_chosen(tmp_path):
    h = discover(make_host_tree(tmp_path, online="0-1"))
    assert place(h, Request(GIB, ncpus=2)).cpus == [2, 3]
    with pytest.raises(UsageError, match=r"^NUMA node 0 has no room for 3 CPUs and 1G of memory \(free: node 0: CPUs 2-3,"):
        place(h, Request(GIB, ncpus=3))


def test_relaunch_by_name_gets_the_same_resources(one):
    a = held("web", [2, 3], 4 * GIB, GIB)
    p = place(one, Request(GIB, ncpus=2, name="web"), [a])
    assert (p.cpus, p.mem_base, p.relaunch) == ([2, 3], 4 * GIB, "web")
    with pytest.raises(UsageError, match="slice 'web' already holds CPUs 2-3 and 1G@0x100000000; relaunch it with 2 CPUs"):
        place(one, Request(GIB, ncpus=1, name="web"), [a])


def test_bad_requests(one):
    with pytest.raises(UsageError, match="not a positive multiple of 4K"):
        place(one, Request(GIB + 1, ncpus=1))
    with pytest.raises(UsageError, match="at least one CPU"):
        place(one, Request(GIB, ncpus=0))


def test_held_from_ledger_rows_and_unrecorded_slot_records(one):
    row = SliceRecord(name="a", cpus=(1,), apic_ids=(1,), mem_base=GIB, mem_size=GIB // 2)
    same = SlotRecord(BOOT_ID, (1,), GIB, GIB // 2)       # the same slice, seen in low memory
    lost = SlotRecord(BOOT_ID, (3,), 4 * GIB, GIB)        # a slice the ledger does not know
    h = held_resources(one, [row], [same, lost])
    assert [x.cpus for x in h] == [frozenset({1}), frozenset({3})]
    free = free_resources(one, h)
    assert free[0].cpus == [2]
    assert place(one, Request(GIB, ncpus=1), h).mem_base == 5 * GIB
