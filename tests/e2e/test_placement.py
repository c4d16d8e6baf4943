"""End to end: `coreslice boot --ncpus N --memory SIZE` places slices itself, on NUMA nodes.

The emulated machine has 5 CPUs and two NUMA nodes (CPUs 0-2 with the first 3 GiB of RAM,
CPUs 3-4 with the rest), so the testbed's host has an SRAT.  Three identical requests, each
`coreslice boot --ncpus 2 --memory 512M`: the first takes CPUs 1-2 on node 0 (the host keeps
CPU 0), the second finds node 0 out of CPUs and takes node 1, the third finds no room and is
refused, saying what is free.  The ledger lives on the emulated host's /run (the testbed job
exports CORESLICE_LEDGER).
"""

from __future__ import annotations

import json

import pytest

from coreslice.testbed.run import python_for_host

from .test_slices import boot, check_matches_plan, run_dir  # noqa: F401  (run_dir is a fixture)

pytestmark = pytest.mark.e2e

GIB = 1 << 30
MIB = 1 << 20


def test_placed_slices_do_not_overlap_and_the_third_is_refused(run_dir):  # noqa: F811
    python = python_for_host()[0]
    r = boot(run_dir, ["--ncpus 2 --memory 512M"] * 3, smp=5, numa=2,
             host_cmds=[f"{python} -m coreslice list --json"])
    a, b, bad = r["slices"]
    for s in (a, b):
        check_matches_plan(s)
    pa, pb = a["output"]["placement"], b["output"]["placement"]
    assert (pa["node"], pa["cpus"], pa["memory"]) == (0, [1, 2], {"base": GIB, "size": 512 * MIB})
    assert (pb["node"], pb["cpus"], pb["memory"]) == (1, [3, 4], {"base": 5 * GIB, "size": 512 * MIB})
    assert a["apic_ids"] == [1, 2] and b["apic_ids"] == [3, 4]
    assert a["output"]["slice"]["name"] == "slice-1" and b["output"]["slice"]["name"] == "slice-3"
    assert a["output"]["ledger"] == "/run/coreslice/ledger.sqlite3"

    # The third: refused before touching anything, one line that says what is free.
    assert bad["exit_code"] == 2 and not bad["booted"]
    msg = bad["stderr"].strip()
    assert msg.count("\n") == 0, msg
    assert "no NUMA node has room for 2 CPUs and 512M of memory" in msg
    assert "node 0: CPUs none, largest memory range" in msg and "node 1: CPUs none" in msg

    # `coreslice list` in the host: both slices running, nothing left but memory.
    (listing,) = r["host_cmds"]
    assert listing["exit_code"] == 0, listing["output"]
    doc = json.loads(listing["output"][listing["output"].index("{"):])
    assert [(s["name"], s["state"], s["cpus"]) for s in doc["slices"]] == [
        ("slice-1", "running", [1, 2]), ("slice-3", "running", [3, 4])]
    assert [f["cpus"] for f in doc["free"]] == [[], []]
    assert all(f["memory_bytes"] > 0 for f in doc["free"])
