"""``coreslice eval run|report|plan``: a slice against a VM and native on the same resources
(issue 13 section 3).  Thin: evaluation/ holds the workloads, modes, runner and report."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from coreslice import declared
from coreslice.cli.native import find_slice
from coreslice.cli.slices import LEDGER_HELP
from coreslice.errors import UsageError
from coreslice.evaluation import modes, report as reportmod, results, runner, workloads
from coreslice.evaluation import targets as targetmod
from coreslice.host.snapshot import discover
from coreslice.launch.session import open_ledger
from coreslice.request import check_name

HOST_ROOT = Path("/")  # tests point it at a fake host tree
# Where the target commands run; tests replace it with a fake.
make_target = targetmod.parse_dest
local_target = targetmod.Local

RUN_HELP = """\
Run one built-in workload in one mode, --repeat N times, and write its figures to
DIR/WORKLOAD-MODE[-VARIANT].json (with every raw output under DIR/raw/):

  --mode slice   in the running slice NAME, over ssh (--ssh, default root@ the address of
                 the slice's image); the host in the slice-host profile
  --mode vm      in the VM of coreslice vm --like NAME, over ssh (--ssh, required); the host
                 in the vm-host profile
  --mode native  on this host, booted with the native-eval profile on the slice's CPU count
                 and memory, with the slice's VFs (coreslice native-setup --like NAME)

A mode whose host boot is not the running one is refused (exit 2), naming what differs and
the command that fixes it; coreslice eval plan prints the whole sequence.  The tools come
from Debian packages: coreslice image build --eval-tools puts them in the slice's image (the
VM boots the same image; install them on the native host with apt-get).

workloads:
""" + "\n".join(f"  {w.name:8} {w.summary}" for w in workloads.WORKLOADS.values()) + """

The kv workload's client (memcaslap) runs on this host, or on --client DEST; give --kv-sweep
for the latency-bound figure: the highest throughput, over the connection counts given, whose
p95 latency stays under 10 ms (memcaslap's own rate limit does not work: see workloads.py).
"""

REPORT_HELP = """\
Read the result files of eval run from each DIR (and one level of subdirectories) and print,
per workload, the median of its runs in each mode, their range, and the ratio to native
(higher is better; for a latency, native / mode), with the prototype's hardware figures
(relative to native) as reference columns.  Emulated-machine results are labelled as no
performance claims.
"""


def _progress(args, what: str):
    if getattr(args, "json", False) or getattr(args, "quiet", False):
        return lambda _m: None
    return lambda m: print(f"coreslice eval {what}: {m}", file=sys.stderr, flush=True)


def register(sub) -> None:
    p = sub.add_parser("eval", help="compare a slice with a VM and native on the same resources (run, report, plan)",
                       description="Measure workloads in a slice, a VM and natively on the same resources, and "
                                   "report them side by side (issue 13).")
    esub = p.add_subparsers(dest="eval_command", metavar="COMMAND", required=True)

    r = esub.add_parser("run", help="run one workload in one mode, N times", description=RUN_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="examples:\n"
                               "  coreslice eval run --mode native --like web1 --workload cpu --repeat 5 --out ev/native\n"
                               "  coreslice eval run --mode slice --like web1 --workload storage --disk /dev/nvme0n1 --out ev/slice\n"
                               "exit status: 0 done, 1 a run failed, 2 bad input or wrong host boot (nothing run)")
    r.add_argument("--mode", required=True, choices=results.MODES)
    r.add_argument("--like", required=True, metavar="NAME", help="the slice whose resources every mode uses")
    r.add_argument("--workload", required=True, choices=list(workloads.WORKLOADS), metavar="W",
                   help=f"one of: {', '.join(workloads.WORKLOADS)}")
    r.add_argument("--variant", metavar="LABEL", help="a label for this configuration's column, e.g. 1G for a VM "
                                                      "on 1 GiB pages (the report shows vm-1G)")
    r.add_argument("--repeat", type=int, default=3, metavar="N", help="runs (default: 3; the report takes the median)")
    r.add_argument("--seconds", type=int, default=20, metavar="S", help="length of each run (default: 20)")
    r.add_argument("--out", type=Path, metavar="DIR", help="where the result file goes (required unless --dry-run)")
    r.add_argument("--ssh", metavar="[USER@]HOST[:PORT]", help="the slice or VM to run in (slice default: root@ "
                                                              "the address of the slice's image)")
    r.add_argument("--ssh-key", metavar="FILE", help="the private key for --ssh and --client (default: ssh's own)")
    r.add_argument("--client", metavar="[USER@]HOST[:PORT]", help="where the kv load generator runs (default: here)")
    r.add_argument("--disk", metavar="DEV", help="storage: the block device to read (the slice's NVMe namespace)")
    r.add_argument("--peer", metavar="ADDR", help="network: the iperf3 server (start iperf3 -s there)")
    r.add_argument("--server", metavar="ADDR", help="kv: the target's address as the client reaches it "
                                                   "(default: the slice's address; 127.0.0.1 native)")
    r.add_argument("--kv-sweep", metavar="LIST", help="kv: client connection counts for the latency-bound figure, "
                                                   "e.g. 16,64,256,1024")
    r.add_argument("--graph-nodes", type=int, default=200_000, metavar="N",
                   help="graph: nodes of the random graph (8 edges per node; default: 200000)")
    r.add_argument("--any-profile", action="store_true",
                   help="run although the host boot does not suit the mode (the figures then compare nothing)")
    r.add_argument("--append", action="store_true",
                   help="add the runs to DIR's result file of this workload and mode instead of replacing it "
                        "(to interleave modes: slice, native, slice, native... shares out a noisy machine's "
                        "slow spells between them)")
    r.add_argument("--dry-run", action="store_true", help="check and print the commands; run nothing")
    r.add_argument("--ledger", type=Path, metavar="PATH", help=LEDGER_HELP)
    r.add_argument("--slices-dir", type=Path, metavar="DIR",
                   help=f"where slices are declared (default: ${declared.ENV}, else {declared.DEFAULT_DIR})")
    r.add_argument("--json", action="store_true", help="print the result file's JSON")
    r.set_defaults(func=cmd_run)

    rep = esub.add_parser("report", help="medians, spread and ratios to native of eval run results",
                          description=REPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog="example:\n  coreslice eval report ev --plot ev/report.png --html ev/report.html")
    rep.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
    rep.add_argument("--plot", type=Path, metavar="FILE.png", help="draw slice and VM relative to native (matplotlib)")
    rep.add_argument("--html", type=Path, metavar="FILE", help="write the table as an HTML page")
    rep.add_argument("--out", type=Path, metavar="FILE.json", help="write the report as JSON")
    rep.add_argument("--json", action="store_true", help="print the report as JSON")
    rep.set_defaults(func=cmd_report)

    pl = esub.add_parser("plan", help="the sequence of host boots and runs of a whole evaluation",
                         description="Print the steps of a whole evaluation on hardware: each mode needs its own "
                                     "host boot (profile), then its runs; the running boot's step is marked.")
    pl.add_argument("--like", required=True, metavar="NAME", help="the slice evaluated")
    pl.add_argument("--workloads", default=",".join(w for w in workloads.WORKLOADS), metavar="LIST",
                    help="comma-separated (default: all)")
    pl.add_argument("--repeat", type=int, default=5, metavar="N", help="runs per workload and mode (default: 5)")
    pl.add_argument("--out", default="eval", metavar="DIR", help="results directory (default: eval)")
    pl.add_argument("--ledger", type=Path, metavar="PATH", help=LEDGER_HELP)
    pl.add_argument("--slices-dir", type=Path, metavar="DIR", help="where slices are declared")
    pl.add_argument("--json", action="store_true", help="print the steps as JSON")
    pl.set_defaults(func=cmd_plan)


def _host_facts(host) -> modes.HostFacts:
    vendor = ""
    try:
        vendor = (HOST_ROOT / "sys/class/dmi/id/sys_vendor").read_text()
    except OSError:
        pass
    try:
        flags = (HOST_ROOT / "proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    hyper = any(line.startswith("flags") and " hypervisor" in line for line in flags.splitlines())
    return modes.HostFacts(host.cmdline, sum(1 for c in host.cpus if c.online), vendor, hyper)


def _native_setup_done(sl) -> bool:
    """native-setup --like NAME is in place (its undo record), or the slice has no VFs to give."""
    from coreslice.cli import native as native_cli
    from coreslice.launch import native as native_effects
    return not sl.vfs or native_effects.state_path(sl.name, native_cli.STATE_DIR).exists()


def _check_out_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} is a file; give a directory for the results")
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("/"))
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--out {path}: {parent} is not writable")


def _check_output(path: Path | None, flag: str) -> None:
    if path is None:
        return
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise UsageError(f"{flag} {path}: its directory {path.parent} does not exist or is not writable")


def _slice_running(ledger, name: str) -> bool:
    return any(r.name == name and r.state == "running" for r in ledger.holding())


def _context(args):
    check_name(args.like)
    host = discover(HOST_ROOT)
    ledger = open_ledger(args.ledger, host, readonly=True)
    sl = find_slice(args.like, ledger, args.slices_dir)
    return host, ledger, sl


def _kv_sweep(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        conns = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--kv-sweep '{text}': comma-separated connection counts, e.g. 16,64,256") from None
    if not conns or any(not 1 <= c <= 65536 for c in conns):
        raise UsageError(f"--kv-sweep '{text}': every connection count must be 1 to 65536")
    return tuple(sorted(set(conns)))


def cmd_run(args) -> int:
    runner.check_repeat(args.repeat)
    if not 1 <= args.seconds <= 3600:
        raise UsageError(f"--seconds {args.seconds}: give 1 to 3600")
    if not 100 <= args.graph_nodes <= 100_000_000:
        raise UsageError(f"--graph-nodes {args.graph_nodes}: give 100 to 100000000")
    if args.out is None and not args.dry_run:
        raise UsageError("eval run needs --out DIR (where the result file goes)")
    variant = results.check_variant(args.variant)
    w = workloads.get(args.workload)
    host, ledger, sl = _context(args)
    facts = _host_facts(host)
    running = _slice_running(ledger, sl.name)
    native_setup = _native_setup_done(sl)
    gaps = modes.gaps(args.mode, facts, sl, running, native_setup=native_setup)
    if gaps and not args.any_profile:
        raise UsageError(f"--mode {args.mode} needs another host boot: {'; '.join(gaps)}; {modes.fix(args.mode, sl)} "
                         "(coreslice eval plan prints the whole sequence; --any-profile runs anyway)")
    address = sl.address.split("/")[0] if sl.address else None
    if args.mode == "native":
        if args.ssh:
            raise UsageError("--mode native runs on this host; drop --ssh")
        target = local_target()
    else:
        dest = args.ssh or (f"root@{address}" if args.mode == "slice" and address else None)
        if not dest:
            raise UsageError(f"--mode {args.mode} needs --ssh [USER@]HOST: " +
                             ("the VM's address" if args.mode == "vm" else
                              f"slice '{sl.name}''s image records no static address"))
        target = make_target(dest, args.ssh_key)
    client = make_target(args.client, args.ssh_key) if args.client else local_target()
    # kv's client reaches the server at: the slice's or VM's address; natively, the address
    # native-setup gave the slice's NIC VF, else loopback (client and server then share the CPUs).
    server = args.server or (address or "127.0.0.1" if args.mode == "native" else
                             (target.dest.split("@")[-1] if isinstance(target, targetmod.Ssh) else None))
    if args.client and server in ("127.0.0.1", "localhost", "::1"):
        raise UsageError(f"--client {args.client} would reach its own loopback: give --server ADDR, this host's "
                         "address as the client sees it")
    p = workloads.Params(cpus=sl.ncpus, mem_mib=sl.mem_size >> 20, seconds=args.seconds, disk=args.disk, peer=args.peer, server=server,
                         kv_sweep=_kv_sweep(args.kv_sweep), graph_nodes=args.graph_nodes)
    workloads.check_params(w, p)
    where = {"target": target, "client": client}
    steps = w.steps(p)
    if args.dry_run:
        out = {"ok": True, "dry_run": True, "workload": w.name, "mode": args.mode, "variant": variant,
               "profile_gaps": gaps, "steps": [{"where": where[s.where].name, "argv": list(s.argv)} for s in steps]}
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            for g in gaps:
                print(f"coreslice: warning: {g}", file=sys.stderr)
            for s in steps:
                print(f"{where[s.where].name}: {' '.join(s.argv) if s.label != 'bfs' else 'python3 -c <graph BFS script>'}")
        return 0
    _check_out_dir(args.out)
    missing = runner.missing_tools(w, p, where)
    if missing:
        raise UsageError(f"workload '{w.name}' needs {', '.join(missing)}: build the slice's image with "
                         f"coreslice image build --eval-tools (packages: {' '.join(w.packages)}), or apt-get "
                         "install them on this host")
    progress = _progress(args, "run")
    env = targetmod.environment(target)
    env.update(mode=args.mode, variant=variant, host_cmdline=facts.cmdline, host_profile_gaps=gaps,
               host_profile=modes.current(facts, sl, running, native_setup=native_setup),
               emulated=facts.emulated, slice=sl.to_json())
    rs = results.ResultSet(w.name, args.mode, variant,
                           {m.name: {"unit": m.unit, "higher_is_better": m.higher_is_better} for m in w.metrics},
                           environment=env)
    if args.append:
        rs.runs = results.earlier_runs(args.out, rs)
    runner.run(w, p, where, rs, args.repeat, args.out / "raw", progress)
    path = results.save(args.out, rs)
    if args.json:
        print(json.dumps(rs.to_json() | {"file": str(path)}, indent=2))
    else:
        for m in w.metrics:
            vals = rs.values(m.name)
            if vals:
                print(f"{w.name} {rs.column} {m.name}: median {statistics.median(vals):.6g} {m.unit} "
                      f"over {len(vals)} runs")
        print(f"written {path}")
    return 0


def cmd_report(args) -> int:
    for path, flag in ((args.out, "--out"), (args.plot, "--plot"), (args.html, "--html")):
        _check_output(path, flag)
    sets = results.load_dirs(args.dirs)
    rows, columns = reportmod.build(sets)
    doc = reportmod.to_json(rows, columns, sets)
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    if args.plot:
        try:
            reportmod.plot(rows, columns, sets, args.plot)
        except ImportError:
            raise UsageError("--plot needs matplotlib in coreslice's Python (scripts/setup-venv.sh installs it)") from None
    if args.html:
        plot_ref = None
        if args.plot:
            try:
                plot_ref = str(args.plot.resolve().relative_to(args.html.resolve().parent))
            except ValueError:
                plot_ref = str(args.plot.resolve())
        args.html.write_text(reportmod.html_page(rows, columns, sets, plot_ref))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(reportmod.text(rows, columns, sets), end="")
    return 0


def cmd_plan(args) -> int:
    runner.check_repeat(args.repeat)
    names = [x.strip() for x in args.workloads.split(",") if x.strip()]
    for n in names:
        workloads.get(n)
    host, ledger, sl = _context(args)
    here = modes.current(_host_facts(host), sl, _slice_running(ledger, sl.name))
    steps = modes.plan(sl, names, args.repeat, args.out, here)
    if args.json:
        print(json.dumps({"slice": sl.to_json(), "here": here, "steps": steps}, indent=2))
    else:
        print(modes.render(steps), end="")
    return 0
