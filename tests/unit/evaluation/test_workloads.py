"""The workloads' parsers read real tool output (captured from Debian bookworm's sysbench 1.0.20,
fio 3.33, iperf3 3.12 and libmemcached-tools 1.1.4 into data/), and refuse output without the
figure; their command lines carry the parameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from coreslice.errors import UsageError
from coreslice.evaluation import workloads as wl
from coreslice.evaluation.workloads import ParseError, Params

DATA = Path(__file__).parent / "data"


def data(name: str) -> str:
    return (DATA / name).read_text()


def test_sysbench_cpu_and_memory():
    assert wl.get("cpu").parse({"sysbench": data("sysbench-cpu.txt")}, Params()) == {"events_per_s": 806.19}
    assert wl.get("memory").parse({"sysbench": data("sysbench-memory.txt")}, Params()) == {"mib_per_s": 5351.03}
    with pytest.raises(ParseError, match="events per second"):
        wl.get("cpu").parse({"sysbench": "FATAL: unknown test\n"}, Params())
    (st,) = wl.get("cpu").steps(Params(cpus=3, seconds=7))
    assert st.argv == ("sysbench", "cpu", "--threads=3", "--time=7", "run") and st.where == "target"


def test_fio_iops_and_p99_latency():
    got = wl.get("storage").parse({"fio": data("fio-randread.json")}, Params())
    assert got == {"iops": pytest.approx(25234.588471), "p99_latency_us": pytest.approx(5734.4)}
    with pytest.raises(ParseError, match="printed no JSON"):
        wl.get("storage").parse({"fio": "fio: pid=0, err=2/file:filesetup.c\n"}, Params())
    (st,) = wl.get("storage").steps(Params(disk="/dev/nvme0n1", seconds=5))
    assert "--filename=/dev/nvme0n1" in st.argv and "--readonly" in st.argv and "--iodepth=32" in st.argv


def test_iperf3_throughput():
    got = wl.get("network").parse({"iperf3": data("iperf3-client.json")}, Params())
    assert got == {"gbit_per_s": pytest.approx(8.234587559332)}
    with pytest.raises(ParseError, match="unable to connect"):
        wl.get("network").parse({"iperf3": '{"start": {}, "error": "unable to connect to server"}'}, Params())


def test_memcaslap_peak_and_the_p95_from_its_histogram():
    assert wl._memcaslap_tps(data("memcaslap-peak.txt"), "peak") == 40579
    stats = data("memcaslap-stats.txt")
    # The histogram of all requests (Total), bucket k = (2^(k-1), 2^k] us: its first bucket holds
    # the run's Min (24 us: bucket 5, up to 32) and its last the Max (6031 us: bucket 13, up to
    # 8192).  2 + 4 + 2967 up to 128 us, 79502 more up to 256, 87169 more up to 512: the 95th
    # percentile (164291st of 172937) is in (256, 512].
    assert wl.log2_percentile_us(stats, 0.0000001) == 32.0
    assert wl.log2_percentile_us(stats, 1.0) == 8192.0
    assert wl.log2_percentile_us(stats, 0.95) == 512.0
    assert wl.log2_percentile_us(stats, 0.01) == 128.0
    p = Params(server="10.0.0.2", kv_sweep=(16, 64))
    steps = wl.get("kv").steps(p)
    assert [s.label for s in steps] == ["memcached", "peak", "conc-16", "conc-64"]
    assert steps[0].background and steps[0].stop and steps[0].where == "target"
    def opt(argv, flag):  # memcaslap's own options, after `sh -c SCRIPT memcaslap`
        return argv[argv.index(flag, 4) + 1]
    assert steps[2].argv[3] == "memcaslap" and opt(steps[2].argv, "-c") == "16" and "-S" in steps[2].argv
    assert steps[2].program == "memcaslap" and steps[0].program == "memcached"
    assert "10.0.0.2:11311" in steps[1].argv  # not Debian's own memcached service port
    # The threads divide the connections (memcaslap refuses otherwise): 4 threads for 16 and 64, 2 for 6.
    assert opt(wl.get("kv").steps(Params(server="x", kv_sweep=(6,)))[2].argv, "-T") == "2"
    assert opt(steps[2].argv, "-T") == "4"
    # 64 connections: more throughput, but its p95 is past 10 ms (most requests in (16, 32] ms).
    slow = stats.replace("      12:      250       47", "      12:      250       47        0   200000")
    slow = slow.replace("TPS: 57605", "TPS: 90000")
    got = wl.get("kv").parse({"peak": data("memcaslap-peak.txt"), "conc-16": stats, "conc-64": slow}, p)
    # The peak is the best of every run (the sweep's 64 beats the 64-connection peak run here).
    assert got == {"peak_ops_per_s": 90000.0, "max_load_p95_10ms_ops_per_s": 57605.0}
    with pytest.raises(ParseError, match="no latency histogram"):
        wl.log2_percentile_us(data("memcaslap-peak.txt"), 0.95)


def test_graph_and_missing_parameters():
    assert wl.get("graph").parse({"bfs": "bfs runs=3 edges=3000000 seconds=2.000\n"}, Params()) == {"teps": 1.5e6}
    with pytest.raises(ParseError):
        wl.get("graph").parse({"bfs": "bfs runs=0 edges=0 seconds=2.000\n"}, Params())
    with pytest.raises(UsageError, match="--disk DEV"):
        wl.check_params(wl.get("storage"), Params())
    with pytest.raises(UsageError, match="unknown workload 'ycsb'"):
        wl.get("ycsb")
    assert set(wl.EVAL_PACKAGES) == {"sysbench", "fio", "iperf3", "memcached", "libmemcached-tools", "python3-networkx"}


def test_graph_script_runs_on_networkx():
    import subprocess

    import networkx as nx  # a test dependency here; python3-networkx in the images
    import sys
    out = subprocess.run([sys.executable, "-c", wl.GRAPH_SCRIPT, "2000", "0.2"], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(Path(nx.__file__).parent.parent)}).stdout
    assert wl.get("graph").parse({"bfs": out}, Params())["teps"] > 0
