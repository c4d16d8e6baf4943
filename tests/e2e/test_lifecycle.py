"""End to end: a slice stopped and restarted 20 times without rebooting the host, its memory
scrubbed, and a launch killed with SIGKILL half-way and recovered.

One testbed run: slice `cyc` (CPUs 1-2, 256 MiB, a marker on its command line) is booted by the
testbed; a host command then restarts it 20 times, each time waiting until its user space has
written its report into its kernel log (`coreslice console --wait`, read from the slice's RAM),
records /proc/interrupts and /proc/meminfo around the cycles, stops it and scans its range for
the marker; then a second launch (CPU 3) is killed with SIGKILL in its `writing` phase (CPUs
parked, memory being written) and recovered with `coreslice restart`.
"""

from __future__ import annotations

import json
import secrets
import shlex
from pathlib import Path

import pytest

from coreslice.testbed.initramfs import REPORT_TAG
from coreslice.testbed.interrupts import totals
from coreslice.testbed.report import first_trouble
from coreslice.testbed.run import RunOptions, run

pytestmark = pytest.mark.e2e

CYCLES = 20
MEM = 256 << 20

# Counts a byte string in physical memory [base, base + size), reading 16 MiB at a time through
# the loader's own /dev/mem access (chunks overlap by len(marker) - 1 so none is missed).
SCAN = r"""
import sys
from coreslice.machine.physmem import DevMem
base, size, marker = int(sys.argv[1], 0), int(sys.argv[2], 0), sys.argv[3].encode()
mem, n, pos, step = DevMem(), 0, 0, 16 << 20
while pos < size:
    chunk = mem.read(base + pos, min(step + len(marker) - 1, size - pos))
    n += chunk.count(marker)
    pos += step
print(n)
"""


@pytest.fixture
def run_dir(request):
    import os
    import time

    from coreslice.testbed.paths import cache_dir
    return cache_dir() / "test-runs" / f"{request.node.name}-{time.strftime('%H%M%S')}-{os.getpid()}"


def _script(marker: str, kernel_initrd: str) -> str:
    q = shlex.quote
    wait = f"coreslice console cyc --wait {q(REPORT_TAG)} --timeout 120"
    return "\n".join([
        "cat > scan.py <<'EOF'", SCAN.strip(), "EOF",
        "coreslice list --json > list0.json",
        'base=$(python3 -c "import json; d=json.load(open(\'list0.json\')); print(d[\'slices\'][0][\'memory\'][\'base\'])")',
        f"python3 scan.py $base {MEM} {q(marker)} > marker-running.txt",
        f"{wait} > console-0.txt 2>&1; echo $? > console-0.rc",
        "cat /proc/interrupts > irq-before.txt",
        "grep -E 'MemAvailable|Slab' /proc/meminfo > mem-0.txt",
        f"i=1; while [ $i -le {CYCLES} ]; do",
        "  coreslice restart cyc --json > restart-$i.json 2> restart-$i.err; echo $? > restart-$i.rc",
        f"  {wait} > console-$i.txt 2>&1; rc=$?; echo $rc > console-$i.rc",
        # A cycle that never reported: QEMU's view of its CPUs while they are still stuck (once).
        '  if [ $rc -ne 0 ] && [ ! -e postmortem-cyc.done ]; then',
        '    coreslice status cyc --json > status-$i.json 2>&1; postmortem cyc 1 2; fi',
        "  grep -E 'MemAvailable|Slab' /proc/meminfo > mem-$i.txt",
        "  i=$((i+1))",
        "done",
        "cat /proc/interrupts > irq-after.txt",
        "coreslice stop cyc --json > stop.json 2> stop.err; echo $? > stop.rc",
        f"python3 scan.py $base {MEM} {q(marker)} > marker-stopped.txt",
        # A launch killed in its writing phase: CPUs parked, the image half written.
        f"CORESLICE_TEST_PAUSE_AT=writing CORESLICE_TEST_PAUSE_FILE=$PWD/paused coreslice boot {kernel_initrd}"
        " --cpus 3 --memory 256M --name k9 --console 0000:41:00.0 > k9-boot.out 2>&1 &",
        "n=0; while [ ! -e paused ] && [ $n -lt 600 ]; do sleep 0.2; n=$((n+1)); done",
        "kill -9 $(cut -d' ' -f1 paused); sleep 0.5",
        "coreslice list --all --json > k9-list.json",
        "coreslice restart k9 --json > k9-restart.json 2> k9-restart.err; echo $? > k9-restart.rc",
        f"coreslice console k9 --wait {q(REPORT_TAG)} --timeout 120 > k9-console.txt 2>&1; echo $? > k9-console.rc",
        "coreslice list --all --json > list-end.json",
        "uptime > host-still-up.txt",
    ])


def _never_reported(d: Path, i: int) -> str:
    """Why cycle i failed, for the assertion message: the first oops/stall block of its log, its
    tail, the cycles that failed, and where QEMU's view of the stuck CPUs was saved."""
    log = (d / f"console-{i}.txt").read_text(errors="replace")
    failed = [j for j in range(CYCLES + 1)
              if (d / f"console-{j}.rc").exists() and (d / f"console-{j}.rc").read_text().strip() != "0"]
    return (f"cycle {i} never reported (failed cycles: {failed}; vCPU state: {d / 'postmortem-cyc.txt'})\n"
            f"-- first trouble --\n{first_trouble(log) or '(none)'}\n-- tail --\n{log[-1500:]}")


def test_twenty_restarts_scrub_and_a_killed_launch(run_dir, testbed_ready):
    kernel, _host_initrd, slice_initrd = testbed_ready
    marker = "csmark" + secrets.token_hex(8)
    ki = f"--kernel {shlex.quote(str(kernel.vmlinuz))} --initrd {shlex.quote(str(slice_initrd))}"
    result = run(RunOptions(
        slices=[f"--cpus 1-2 --memory 256M --name cyc --cmdline coreslice.marker={marker}"],
        host_cmds=[_script(marker, ki)], workdir=run_dir, timeout=1500))
    host = result["host"]
    assert host.get("error") is None, host
    (s,) = result["slices"]
    assert s["booted"], s["console_log"]
    d = Path(host["run_dir"])
    out = result["host_cmds"][0]
    assert out["exit_code"] == 0, out["output"]

    def rc(name: str) -> int:
        return int((d / name).read_text().strip())

    # The marker is found while the slice runs, and nowhere in its range after stop.
    assert int((d / "marker-running.txt").read_text()) > 0
    assert rc("stop.rc") == 0, (d / "stop.err").read_text()
    assert json.loads((d / "stop.json").read_text())["scrubbed_bytes"] >= MEM
    assert int((d / "marker-stopped.txt").read_text()) == 0
    # Every cycle: restart succeeded and the slice's user space reported, seen in its RAM.
    base = None
    for i in range(0, CYCLES + 1):
        assert rc(f"console-{i}.rc") == 0, _never_reported(d, i)
        assert REPORT_TAG in (d / f"console-{i}.txt").read_text()
        if i:
            assert rc(f"restart-{i}.rc") == 0, (i, (d / f"restart-{i}.err").read_text())
            doc = json.loads((d / f"restart-{i}.json").read_text())
            got = (doc["slice"]["cpus"], doc["slice"]["memory"]["base"], doc["plan"]["low_slot"]["base"])
            assert base is None or got == base, (i, got, base)
            base = got
            assert doc["wake"]["kernel_s"] < 2.0
    assert base[0] == [1, 2]
    # Host IPI counters unchanged across the 20 cycles (no IPI reached the host's CPU).
    before = totals((d / "irq-before.txt").read_text())
    after = totals((d / "irq-after.txt").read_text())
    for k in ("CAL", "RES", "TLB"):
        assert after.get(k) == before.get(k), (k, before.get(k), after.get(k))

    # No growth of host memory use.  MemAvailable moves by a few MiB either way from one cycle to
    # the next (page cache of the 9p-shared tree), so compare medians of the first and last five
    # cycles; the kernel's own allocations (Slab) are steady to a few KiB.
    def meminfo(i: int, key: str) -> int:
        for line in (d / f"mem-{i}.txt").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise AssertionError(f"mem-{i}.txt has no {key}")

    avail = [meminfo(i, "MemAvailable") for i in range(1, CYCLES + 1)]
    first, last = sorted(avail[:5])[2], sorted(avail[-5:])[2]
    assert first - last < 2048, avail  # KiB
    assert meminfo(CYCLES, "Slab") - meminfo(1, "Slab") < 512, [meminfo(i, "Slab") for i in range(CYCLES + 1)]
    # Ledger consistent: 21 rows of cyc on the same resources, all stopped.
    rows = [r for r in json.loads((d / "list-end.json").read_text())["slices"] if r["name"] == "cyc"]
    assert len(rows) == CYCLES + 1 and {r["state"] for r in rows} == {"stopped"}
    assert {(tuple(r["cpus"]), r["memory"]["base"], r["low_slot"]) for r in rows} == {((1, 2), base[1], base[2])}
    # The killed launch: list says what it left, restart brings it up.
    (k9,) = [r for r in json.loads((d / "k9-list.json").read_text())["slices"] if r["name"] == "k9"]
    assert k9["state"] == "launching" and k9["phase"] == "writing" and "died while writing" in k9["note"]
    assert rc("k9-restart.rc") == 0, (d / "k9-restart.err").read_text()
    assert rc("k9-console.rc") == 0, (d / "k9-console.txt").read_text()[-2000:]
    assert (d / "host-still-up.txt").read_text().strip()
