"""The built-in workloads of ``coreslice eval run``: command lines and output parsers (pure).

Every tool is a Debian package (``image build --eval-tools`` puts them in a slice's image; the
native host and a VM from the same image have them too).  A workload runs on the target (the
slice, the VM or this host) as one command and yields one or more metrics; ``kv`` also runs a
load generator on the client side (this host, or ``--client``).

Why these tools: sysbench (cpu, memory bandwidth) and fio (storage) are what system papers use;
iperf3 is the standard TCP throughput test; memcached with libmemcached's memcaslap is the data
caching pair of the prototype's CloudSuite runs, in Debian; networkx's BFS stands in for graph
analytics (pointer chasing over a large graph, like the prototype's graph workload).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from coreslice.errors import UsageError


class ParseError(ValueError):
    """A tool's output lacks the figure a workload reads from it."""


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    higher_is_better: bool = True


@dataclass(frozen=True)
class Params:
    """What a workload's command depends on: the target's CPUs, run length, devices, peers."""

    cpus: int = 1
    mem_mib: int = 1024            # the target's memory (the slice's size)
    seconds: int = 20
    disk: str | None = None        # storage: the block device (the slice's NVMe namespace)
    peer: str | None = None        # network: the iperf3 server's address
    server: str | None = None      # kv: the target's address, as the client reaches it
    # Not 11211: Debian's memcached package starts its own service there.
    kv_port: int = 11311
    kv_threads: int = 4            # kv client threads
    kv_connections: int = 64       # kv client connections in all
    kv_sweep: tuple[int, ...] = ()  # kv: connection counts for the latency-bound figure
    graph_nodes: int = 200_000


@dataclass(frozen=True)
class Step:
    """One command of a workload: ``where`` is "target" (the system measured) or "client"."""

    where: str
    argv: tuple[str, ...]
    label: str
    background: bool = False      # a server left running for the next steps (stopped by ``stop``)
    stop: tuple[str, ...] = ()    # the command that stops it afterwards
    tool: str = ""                # the program it needs, when argv[0] is a wrapper (sh -c)
    extra_s: float = 0            # time on top of the run length (building a graph, say)

    @property
    def program(self) -> str:
        return self.tool or self.argv[0]


@dataclass(frozen=True)
class Workload:
    name: str
    summary: str
    packages: tuple[str, ...]
    metrics: tuple[Metric, ...]
    steps: Callable[[Params], list[Step]]
    parse: Callable[[dict[str, str], Params], dict[str, float]]  # step label -> its stdout
    needs: tuple[str, ...] = field(default=())  # Params fields that must be set
    # Checks run before anything (where, argv, what is missing when it fails): a Python module,
    # a block device.
    checks: Callable[[Params], list[tuple[str, tuple[str, ...], str]]] = field(default=lambda _p: [])


def _number(pattern: str, text: str, what: str) -> float:
    m = re.search(pattern, text, re.M)
    if not m:
        raise ParseError(f"no {what} in the output")
    return float(m.group(1))


def _json(text: str, what: str) -> dict:
    # fio prints notes before its JSON on some errors; the document starts at the first brace.
    start = text.find("{")
    if start < 0:
        raise ParseError(f"{what} printed no JSON")
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError as e:
        raise ParseError(f"{what}'s JSON does not parse: {e}") from None


# -- cpu, memory: sysbench 1.0 ---------------------------------------------------------------

def _cpu_steps(p: Params) -> list[Step]:
    return [Step("target", ("sysbench", "cpu", f"--threads={p.cpus}", f"--time={p.seconds}", "run"), "sysbench")]


def _cpu_parse(out: dict[str, str], _p: Params) -> dict[str, float]:
    return {"events_per_s": _number(r"events per second:\s*([0-9.]+)", out["sysbench"], "events per second")}


def memory_block_mib(p: Params) -> int:
    """Each thread's buffer: far larger than any last-level cache (sysbench reads the same block
    over and over: a 1 MiB block would measure the cache), within a quarter of the memory."""
    return max(1, min(256, p.mem_mib // (4 * max(1, p.cpus))))


def _memory_steps(p: Params) -> list[Step]:
    # --memory-scope=local: a buffer per thread (global shares one); a total far beyond what
    # the run reaches, so --time bounds it.
    return [Step("target", ("sysbench", "memory", f"--threads={p.cpus}", f"--time={p.seconds}",
                            f"--memory-block-size={memory_block_mib(p)}M", "--memory-scope=local",
                            "--memory-total-size=100T", "--memory-oper=read", "run"), "sysbench")]


def _memory_parse(out: dict[str, str], _p: Params) -> dict[str, float]:
    return {"mib_per_s": _number(r"\(([0-9.]+) MiB/sec\)", out["sysbench"], "MiB/sec figure")}


# -- storage: fio 4k random read, QD32 ---------------------------------------------------------

def _storage_steps(p: Params) -> list[Step]:
    # --readonly: fio refuses any write, so the slice's file system on the namespace is safe.
    return [Step("target", ("fio", "--name=randread", f"--filename={p.disk}", "--readonly", "--rw=randread",
                            "--bs=4k", "--iodepth=32", "--ioengine=libaio", "--direct=1", "--time_based",
                            f"--runtime={p.seconds}", "--numjobs=1", "--output-format=json"), "fio")]


def _storage_checks(p: Params) -> list[tuple[str, tuple[str, ...], str]]:
    return [("target", ("test", "-b", str(p.disk)), f"the block device {p.disk}")]


def _storage_parse(out: dict[str, str], _p: Params) -> dict[str, float]:
    doc = _json(out["fio"], "fio")
    jobs = doc.get("jobs") or []
    if not jobs:
        raise ParseError("fio's JSON has no jobs")
    if any(j.get("error") for j in jobs):
        raise ParseError(f"fio job failed: error {jobs[0].get('error')}")
    iops = sum(float(j["read"]["iops"]) for j in jobs)
    lat = jobs[0]["read"].get("clat_ns", {}).get("percentile", {}).get("99.000000")
    got = {"iops": iops}
    if lat is not None:
        got["p99_latency_us"] = float(lat) / 1000
    return got


# -- network: iperf3 TCP to a peer --------------------------------------------------------------

def _network_steps(p: Params) -> list[Step]:
    return [Step("target", ("iperf3", "-c", str(p.peer), "-t", str(p.seconds), "-J"), "iperf3")]


def _network_parse(out: dict[str, str], _p: Params) -> dict[str, float]:
    doc = _json(out["iperf3"], "iperf3")
    if doc.get("error"):
        raise ParseError(f"iperf3: {doc['error']}")
    try:
        bps = float(doc["end"]["sum_received"]["bits_per_second"])
    except (KeyError, TypeError, ValueError):
        raise ParseError("iperf3's JSON has no end.sum_received.bits_per_second") from None
    return {"gbit_per_s": bps / 1e9}


# -- graph: BFS over a random graph (networkx) --------------------------------------------------

# Traversed edges per second (Graph500's figure) of breadth-first searches from fixed sources over
# a seeded random graph of n nodes and 8n edges: the same graph on every target.  Building the
# graph is not timed.
GRAPH_SCRIPT = """\
import sys, time
import networkx as nx
n, seconds = int(sys.argv[1]), float(sys.argv[2])
g = nx.gnm_random_graph(n, 8 * n, seed=1)
edges, runs, t0, src = 0, 0, time.perf_counter(), 0
while time.perf_counter() - t0 < seconds:
    seen = nx.single_source_shortest_path_length(g, src)
    edges += sum(g.degree(v) for v in seen) // 2
    runs, src = runs + 1, (src + 7919) % n
print(f"bfs runs={runs} edges={edges} seconds={time.perf_counter() - t0:.3f}")
"""


def _graph_steps(p: Params) -> list[Step]:
    # Building the graph is not timed but takes long on a slow target: ~75 us a node here,
    # allowed 1 ms (an emulated CPU).
    return [Step("target", ("python3", "-c", GRAPH_SCRIPT, str(p.graph_nodes), str(p.seconds)), "bfs",
                 extra_s=p.graph_nodes / 1000)]


def _graph_checks(_p: Params) -> list[tuple[str, tuple[str, ...], str]]:
    return [("target", ("python3", "-c", "import networkx"), "the Python module networkx (python3-networkx)")]


def _graph_parse(out: dict[str, str], _p: Params) -> dict[str, float]:
    m = re.search(r"bfs runs=(\d+) edges=(\d+) seconds=([0-9.]+)", out["bfs"])
    if not m or int(m.group(1)) == 0:
        raise ParseError("no completed BFS in the output")
    return {"teps": int(m.group(2)) / float(m.group(3))}


# -- kv: memcached and memcaslap ----------------------------------------------------------------

P95_BOUND_US = 10_000  # the prototype's data caching figure: the highest load with p95 < 10 ms

# The latency-bound figure comes from a sweep of closed-loop concurrency (connections), not of
# offered rates: memcaslap's rate limit (-P) never throttles in libmemcached-tools 1.1.4 (its
# ms_need_yield divides integers, so the rate it compares is 0), and bookworm has no other
# memcached load generator.  Each concurrency gives a throughput and a p95 latency; the figure is
# the highest throughput whose p95 stays under 10 ms.


PIDFILE = "/tmp/coreslice-eval-memcached.pid"


def _kv_steps(p: Params) -> list[Step]:
    conns = max((p.kv_connections, *p.kv_sweep)) + 64
    cache_mib = max(64, min(1024, p.mem_mib // 4))
    # In the foreground of its own session, not -d: memcached -d forks before it binds, so a port
    # in use would go unnoticed.  Still alive a second later = it listens.
    server = ("sh", "-c", f"setsid memcached -l 0.0.0.0 -p {p.kv_port} -U 0 -t {p.cpus} -m {cache_mib} -c {conns} "
                          f"-u memcache </dev/null >/dev/null 2>&1 & echo $! > {PIDFILE}; sleep 1; "
                          f"kill -0 $(cat {PIDFILE}) || {{ echo 'memcached exited (port {p.kv_port} in use?)' >&2; "
                          "exit 1; }")
    stop = ("sh", "-c", f"p=$(cat {PIDFILE}) && kill $p && while kill -0 $p 2>/dev/null; do sleep 0.1; done; "
                        f"rm -f {PIDFILE}")
    dest = f"{p.server}:{p.kv_port}"

    def client(c: int, *more: str) -> tuple[str, ...]:
        # memcaslap wants the connections a multiple of its threads, and a socket each.
        return ("sh", "-c", f'ulimit -n {c + 256} 2>/dev/null; exec memcaslap "$@"', "memcaslap", "-s", dest,
                "-T", str(math.gcd(p.kv_threads, c)), "-c", str(c), "-t", f"{p.seconds}s", *more)

    steps = [Step("target", server, "memcached", background=True, stop=stop, tool="memcached"),
             Step("client", client(p.kv_connections), "peak", tool="memcaslap")]
    # -S at the run's length: one periodic block, then the histograms of the whole run.
    steps += [Step("client", client(c, "-S", f"{p.seconds}s"), f"conc-{c}", tool="memcaslap") for c in p.kv_sweep]
    return steps


def _memcaslap_tps(text: str, what: str) -> float:
    return _number(r"^Run time: .*?TPS:\s*([0-9.]+)", text, f"TPS line of memcaslap ({what})")


def log2_percentile_us(text: str, q: float) -> float:
    """The q-quantile of memcaslap's histogram of all requests ("Total Statistics", else the
    first): lines ``k: n0 n1 n2 n3`` under "Log2 Dist:", where n_i counts latencies in
    (2^(k+i-1), 2^(k+i)] us (ms_local_log2 rounds up).  Taken as its bucket's upper bound: an
    upper estimate, less than 2x the true value, never below it."""
    total_at = text.find("Total Statistics (")
    parts = text[total_at if total_at >= 0 else 0:].split("Log2 Dist:", 1)
    if len(parts) < 2:
        raise ParseError("memcaslap printed no latency histogram (Log2 Dist; it needs -S)")
    counts: dict[int, int] = {}
    for line in parts[1].splitlines():
        m = re.match(r"\s*(\d+):\s+([\d\s]+)$", line)
        if not m:
            if counts:
                break
            continue
        for i, n in enumerate(m.group(2).split()):
            counts[int(m.group(1)) + i] = counts.get(int(m.group(1)) + i, 0) + int(n)
    total = sum(counts.values())
    if not total:
        raise ParseError("memcaslap's latency histogram is empty")
    need, acc = math.ceil(q * total), 0
    for k in sorted(counts):
        acc += counts[k]
        if acc >= need:
            return float(2 ** k)
    raise AssertionError("unreachable: the counts add up to total")


def _kv_parse(out: dict[str, str], p: Params) -> dict[str, float]:
    peak = _memcaslap_tps(out["peak"], "peak")
    got = {"peak_ops_per_s": peak}
    if p.kv_sweep:
        runs = [(_memcaslap_tps(out[f"conc-{c}"], f"{c} connections"), log2_percentile_us(out[f"conc-{c}"], 0.95))
                for c in p.kv_sweep]
        got["peak_ops_per_s"] = max([peak] + [tps for tps, _ in runs])  # a sweep point may beat the peak run
        got["max_load_p95_10ms_ops_per_s"] = max([tps for tps, p95 in runs if p95 < P95_BOUND_US], default=0.0)
    return got


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("cpu", "sysbench cpu: prime computation on every CPU", ("sysbench",),
             (Metric("events_per_s", "events/s"),), _cpu_steps, _cpu_parse),
    Workload("memory", "sysbench memory: read bandwidth, 1 MiB blocks, every CPU", ("sysbench",),
             (Metric("mib_per_s", "MiB/s"),), _memory_steps, _memory_parse),
    Workload("storage", "fio: 4k random read, QD32, direct, on the NVMe namespace", ("fio",),
             (Metric("iops", "IOPS"), Metric("p99_latency_us", "us", higher_is_better=False)),
             _storage_steps, _storage_parse, needs=("disk",), checks=_storage_checks),
    Workload("network", "iperf3: TCP throughput to a peer (run iperf3 -s there)", ("iperf3",),
             (Metric("gbit_per_s", "Gbit/s"),), _network_steps, _network_parse, needs=("peer",)),
    Workload("kv", "memcached in the target, memcaslap on the client: peak throughput, and the highest "
                   "throughput of a connection sweep whose p95 latency stays under 10 ms", ("memcached", "libmemcached-tools"),
             (Metric("peak_ops_per_s", "ops/s"), Metric("max_load_p95_10ms_ops_per_s", "ops/s")),
             _kv_steps, _kv_parse, needs=("server",)),
    Workload("graph", "networkx: breadth-first searches over a seeded random graph (traversed edges/s)",
             ("python3-networkx",), (Metric("teps", "edges/s"),), _graph_steps, _graph_parse, checks=_graph_checks),
)}

# Every package a target needs for all workloads (image build --eval-tools).
EVAL_PACKAGES = tuple(dict.fromkeys(p for w in WORKLOADS.values() for p in w.packages))


def get(name: str) -> Workload:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise UsageError(f"unknown workload '{name}'; choose from {', '.join(WORKLOADS)}") from None


def check_params(w: Workload, p: Params) -> None:
    flag = {"disk": "--disk DEV (the NVMe namespace's block device)", "peer": "--peer ADDR (an iperf3 -s server)",
            "server": "--server ADDR (the target's address as the client reaches it)"}
    missing = [flag[n] for n in w.needs if getattr(p, n) in (None, "")]
    if missing:
        raise UsageError(f"workload '{w.name}' needs {' and '.join(missing)}")
