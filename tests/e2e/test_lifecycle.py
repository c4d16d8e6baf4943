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
import statistics
from pathlib import Path

import pytest

from coreslice.testbed.initramfs import REPORT_TAG
from coreslice.testbed.interrupts import totals
from coreslice.testbed.report import first_trouble
from coreslice.testbed.run import RunOptions, run

pytestmark = pytest.mark.e2e

CYCLES = 20
MEM_EVERY = 5  # cycles between memory measurements
MEM = 256 << 20
STEP_S = 300  # bound on one restart, stop or console wait (a cycle takes ~1 min under TCG)

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

# After a cycle: the user processes (non-empty cmdline; kernel threads come and go) and the size of
# coreslice's state on disk as `du -sk` counts it; every MEM_EVERY cycles also /proc/meminfo, after
# sync + drop_caches (which slows the next launch: it reads the tree over 9p again).  One Python
# process, not a shell loop: two forks per process cost ~15 s a cycle under TCG.
MEASURE = r"""
import os, sys
i, every = int(sys.argv[1]), int(sys.argv[2])
me, procs = os.getpid(), []
for pid in sorted((int(p) for p in os.listdir("/proc") if p.isdigit())):
    try:
        raw = open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        continue
    if raw and pid != me:
        procs.append(raw.replace(b"\0", b" ").decode(errors="replace"))
open(f"procs-{i}.txt", "w").write("".join(p + "\n" for p in procs))
kib = 0
for top in ("/var/lib/coreslice", "/run/coreslice"):
    for root, _dirs, files in os.walk(top):
        for path in [root] + [os.path.join(root, f) for f in files]:
            try:
                kib += os.lstat(path).st_blocks // 2
            except OSError:
                pass
open(f"state-{i}.txt", "w").write(f"{kib}\n")
if i % every == 0:
    os.sync()
    open("/proc/sys/vm/drop_caches", "w").write("3")
    open(f"mem-{i}.txt", "w").write(open("/proc/meminfo").read())
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
        "cat > measure.py <<'EOF'", MEASURE.strip(), "EOF",
        f"measure() {{ python3 measure.py $1 {MEM_EVERY}; }}",
        "measure 0",
        # Every step is bounded (HOSTCMD_PREAMBLE): a restart that hangs leaves its stacks and the
        # vCPUs' state instead of running into the run's --timeout with nothing to explain it.
        f"i=1; while [ $i -le {CYCLES} ]; do",
        f"  bounded restart-$i {STEP_S} coreslice restart cyc --json > restart-$i.json 2> restart-$i.err; echo $? > restart-$i.rc",
        f"  bounded console-$i {STEP_S} {wait} > console-$i.txt 2>&1; rc=$?; echo $rc > console-$i.rc",
        # A cycle that never reported: QEMU's view of its CPUs while they are still stuck (once).
        '  if [ $rc -ne 0 ] && [ ! -e postmortem-cyc.done ]; then',
        '    coreslice status cyc --json > status-$i.json 2>&1; postmortem cyc 1 2; fi',
        "  measure $i",
        "  i=$((i+1))",
        "done",
        "cat /proc/interrupts > irq-after.txt",
        f"bounded stop {STEP_S} coreslice stop cyc --json > stop.json 2> stop.err; echo $? > stop.rc",
        f"python3 scan.py $base {MEM} {q(marker)} > marker-stopped.txt",
        # A launch killed in its writing phase: CPUs parked, the image half written.
        f"CORESLICE_TEST_PAUSE_AT=writing CORESLICE_TEST_PAUSE_FILE=$PWD/paused coreslice boot {kernel_initrd}"
        " --cpus 3 --memory 256M --name k9 --console 0000:41:00.0 > k9-boot.out 2>&1 &",
        "n=0; while [ ! -e paused ] && [ $n -lt 600 ]; do sleep 0.2; n=$((n+1)); done",
        "kill -9 $(cut -d' ' -f1 paused); sleep 0.5",
        "coreslice list --all --json > k9-list.json",
        f"bounded k9-restart {STEP_S} coreslice restart k9 --json > k9-restart.json 2> k9-restart.err; echo $? > k9-restart.rc",
        f"bounded k9-console {STEP_S} coreslice console k9 --wait {q(REPORT_TAG)} --timeout 120 > k9-console.txt 2>&1; echo $? > k9-console.rc",
        "coreslice list --all --json > list-end.json",
        "uptime > host-still-up.txt",
    ])


def _trend(xs: list[int], ys: list[int]) -> float:
    """Theil-Sen slope of ys against xs: the median of the slopes between every pair of points,
    which one outlier does not move (unlike a least-squares fit)."""
    n = len(xs)
    return statistics.median((ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(n) for j in range(i + 1, n))


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
        host_cmds=[_script(marker, ki)], workdir=run_dir, timeout=2400))
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

    # No growth of host memory use.  Each measurement follows sync + drop_caches, so page cache
    # (the 9p-shared tree, the kernel and initrd read at each launch) is not counted; what stays is
    # memory the host cannot take back.  coreslice's own state files on tmpfs (the ledger gains a
    # row per launch) are counted apart.  Run-to-run jitter of a few hundred KiB (per-CPU page
    # lists, the shell's own allocations) is far below what a leak of even 100 KiB a launch adds
    # over 20 launches, so the trend is fitted robustly (Theil-Sen: the median of pairwise slopes).
    def meminfo(i: int, key: str) -> int:
        for line in (d / f"mem-{i}.txt").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise AssertionError(f"mem-{i}.txt has no {key}")

    def number(name: str) -> int:
        return int((d / name).read_text().split()[0])

    # The first launch is left out: it loads what every later one reuses (modules, caches).
    cycles = range(1, CYCLES + 1)
    points = list(range(MEM_EVERY, CYCLES + 1, MEM_EVERY))
    state = {i: number(f"state-{i}.txt") for i in cycles}
    held = [meminfo(i, "MemTotal") - meminfo(i, "MemAvailable") - state[i] for i in points]
    # Unreclaimable slab only: what a kernel-side leak grows.  The reclaimable part (dentries,
    # inodes) is cache that drop_caches leaves partly in place; it moved by ~300 KiB between
    # measurements of one run, a Theil-Sen slope of 9 KiB a launch from noise alone.
    slab = [meminfo(i, "SUnreclaim") for i in points]
    series = {"cycles": points, "held_kib": held, "sunreclaim_kib": slab, "state_kib": list(state.values()),
              "procs": [len((d / f"procs-{i}.txt").read_text().splitlines()) for i in cycles]}
    (d / "memory-series.json").write_text(json.dumps(series, indent=1))
    assert _trend(points, held) < 32, series  # KiB per launch
    assert _trend(points, slab) < 8, series
    assert state[CYCLES] - state[1] < 16 * (CYCLES - 1), series  # the ledger: well under 16 KiB a row
    # No process left behind by a launch or a stop: user processes (a non-empty cmdline; kernel
    # threads come and go) are as many after every cycle.
    assert len(set(series["procs"])) == 1, (series, [(d / f"procs-{i}.txt").read_text() for i in (1, CYCLES)])
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
