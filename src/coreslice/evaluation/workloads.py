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
    seconds: int = 20
    disk: str | None = None        # storage: the block device (the slice's NVMe namespace)
    peer: str | None = None        # network: the iperf3 server's address
    server: str | None = None      # kv: the target's address, as the client reaches it
    kv_port: int = 11211
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


@dataclass(frozen=True)
class Workload:
    name: str
    summary: str
    packages: tuple[str, ...]
    metrics: tuple[Metric, ...]
    steps: Callable[[Params], list[Step]]
    parse: Callable[[dict[str, str], Params], dict[str, float]]  # step label -> its stdout
    needs: tuple[str, ...] = field(default=())  # Params fields that must be set


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


def _memory_steps(p: Params) -> list[Step]:
    # A total far beyond what the run reaches, so --time bounds it; 1 MiB blocks measure
    # bandwidth, not the TLB.
    return [Step("target", ("sysbench", "memory", f"--threads={p.cpus}", f"--time={p.seconds}",
                            "--memory-block-size=1M", "--memory-total-size=100T", "--memory-oper=read", "run"),
                 "sysbench")]


def _memory_parse(out: dict[str, str], _p: Params) -> dict[str, float]:
    return {"mib_per_s": _number(r"\(([0-9.]+) MiB/sec\)", out["sysbench"], "MiB/sec figure")}


# -- storage: fio 4k random read, QD32 ---------------------------------------------------------

def _storage_steps(p: Params) -> list[Step]:
    # --readonly: fio refuses any write, so the slice's file system on the namespace is safe.
    return [Step("target", ("fio", "--name=randread", f"--filename={p.disk}", "--readonly", "--rw=randread",
                            "--bs=4k", "--iodepth=32", "--ioengine=libaio", "--direct=1", "--time_based",
                            f"--runtime={p.seconds}", "--numjobs=1", "--output-format=json"), "fio")]


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
    return [Step("target", ("python3", "-c", GRAPH_SCRIPT, str(p.graph_nodes), str(p.seconds)), "bfs")]


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


def _kv_steps(p: Params) -> list[Step]:
    server = ("memcached", "-d", "-l", "0.0.0.0", "-p", str(p.kv_port), "-U", "0", "-t", str(p.cpus),
              "-m", "1024", "-u", "memcache", "-P", "/tmp/coreslice-eval-memcached.pid")
    stop = ("sh", "-c", "kill $(cat /tmp/coreslice-eval-memcached.pid) && rm -f /tmp/coreslice-eval-memcached.pid")
    dest = f"{p.server}:{p.kv_port}"

    def client(conns: int, *more: str) -> tuple[str, ...]:
        return ("memcaslap", "-s", dest, "-T", str(min(p.kv_threads, conns)), "-c", str(conns),
                "-t", f"{p.seconds}s", *more)

    steps = [Step("target", server, "memcached", background=True, stop=stop),
             Step("client", client(p.kv_connections), "peak")]
    # -S at the run's length: one periodic block, then the histograms of the whole run.
    steps += [Step("client", client(c, "-S", f"{p.seconds}s"), f"conc-{c}") for c in p.kv_sweep]
    return steps


def _memcaslap_tps(text: str, what: str) -> float:
    return _number(r"^Run time: .*?TPS:\s*([0-9.]+)", text, f"TPS line of memcaslap ({what})")


def log2_percentile_us(text: str, q: float) -> float:
    """The q-quantile of the first latency histogram memcaslap prints (its gets'): lines
    ``k: n0 n1 n2 n3`` under "Log2 Dist:", where n_i counts latencies in [2^(k+i), 2^(k+i+1)) us.
    Taken as its bucket's upper bound: an upper estimate, at most 2x the true value, never below."""
    parts = text.split("Log2 Dist:", 1)
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
            return float(2 ** (k + 1))
    raise AssertionError("unreachable: the counts add up to total")


def _kv_parse(out: dict[str, str], p: Params) -> dict[str, float]:
    got = {"peak_ops_per_s": _memcaslap_tps(out["peak"], "peak")}
    if p.kv_sweep:
        ok = [_memcaslap_tps(out[f"conc-{c}"], f"{c} connections") for c in p.kv_sweep
              if log2_percentile_us(out[f"conc-{c}"], 0.95) < P95_BOUND_US]
        got["max_load_p95_10ms_ops_per_s"] = max(ok) if ok else 0.0
    return got


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("cpu", "sysbench cpu: prime computation on every CPU", ("sysbench",),
             (Metric("events_per_s", "events/s"),), _cpu_steps, _cpu_parse),
    Workload("memory", "sysbench memory: read bandwidth, 1 MiB blocks, every CPU", ("sysbench",),
             (Metric("mib_per_s", "MiB/s"),), _memory_steps, _memory_parse),
    Workload("storage", "fio: 4k random read, QD32, direct, on the NVMe namespace", ("fio",),
             (Metric("iops", "IOPS"), Metric("p99_latency_us", "us", higher_is_better=False)),
             _storage_steps, _storage_parse, needs=("disk",)),
    Workload("network", "iperf3: TCP throughput to a peer (run iperf3 -s there)", ("iperf3",),
             (Metric("gbit_per_s", "Gbit/s"),), _network_steps, _network_parse, needs=("peer",)),
    Workload("kv", "memcached in the target, memcaslap on the client: peak throughput, and the highest "
                   "throughput of a connection sweep whose p95 latency stays under 10 ms", ("memcached", "libmemcached-tools"),
             (Metric("peak_ops_per_s", "ops/s"), Metric("max_load_p95_10ms_ops_per_s", "ops/s")),
             _kv_steps, _kv_parse, needs=("server",)),
    Workload("graph", "networkx: breadth-first searches over a seeded random graph (traversed edges/s)",
             ("python3-networkx",), (Metric("teps", "edges/s"),), _graph_steps, _graph_parse),
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
