"""``coreslice plan``, ``list`` and ``stop``, and the placement/ledger helpers ``boot`` shares.

Thin: arguments in, placement.py / ledger.py / launch.py do the work, text or JSON out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from coreslice.errors import CoresliceError, UsageError
from coreslice import config as configmod
from coreslice.cli.host import root_arg
from coreslice.host.snapshot import discover
from coreslice.plan.boot import check_resources
from coreslice.request import slice_defaults
from coreslice.host.sysfs import format_cpu_list, parse_cpu_list
from coreslice.launch.session import open_ledger, slot_records
from coreslice.host.consoles import normalize_pci_address
from coreslice.ledger import ENV as LEDGER_ENV, SliceRecord, explain
from coreslice.machine import FAKE_MACHINE_ENV, for_host as machine_for
from coreslice.plan.placement import Placement, Request, free_resources, held_resources, place
from coreslice.request import check_name
from coreslice.units import format_size, parse_memory


LEDGER_HELP = (f"the ledger file (default: ${LEDGER_ENV}, else /var/lib/coreslice/ledger.sqlite3 when "
               "/var/lib is writable, else /run/coreslice/ledger.sqlite3)")
HOST_ROOT_HELP = ("read the host from a captured tree of its /sys, /proc and /dev/kmsg instead of the live host "
                  "(for tests and planning on another machine)")


def cpu_list_arg(text: str) -> list[int]:
    try:
        cpus = parse_cpu_list(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a CPU list: {e}; write e.g. 1-2,5") from None
    if not cpus:
        raise argparse.ArgumentTypeError("empty CPU list; write e.g. 1-2,5")
    return cpus


def _positive(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number >= 1; give e.g. 2")
    return n


def _node(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a NUMA node number; write e.g. 0")
    return n


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="PATH",
                   help=f"coreslice configuration (default: ${configmod.ENV}, else {configmod.DEFAULT_PATH})")


def add_placement_args(p: argparse.ArgumentParser, *, with_base: bool = True) -> None:
    """--cpus/--ncpus, --memory, --numa-node, --name: what boot and plan share."""
    g = p.add_mutually_exclusive_group()  # neither: slice.ncpus of the config (config.apply_slice_defaults)
    g.add_argument("--cpus", type=cpu_list_arg, metavar="LIST",
                   help="host logical CPUs as in /sys/devices/system/cpu (e.g. 1-2,5); present, offline, not the "
                        "boot CPU. The first one is woken; the slice kernel starts the others")
    g.add_argument("--ncpus", type=_positive, metavar="N",
                   help="let coreslice pick N free CPUs (lowest numbers, one NUMA node)")
    p.add_argument("--memory", metavar="SIZE[@BASE]" if with_base else "SIZE",
                   help="physical RAM for the slice: SIZE@BASE (e.g. 1G@0x40000000: page aligned, RAM in the "
                        "firmware map, above the host's mem= limit) or SIZE alone, and coreslice picks a free "
                        "range on the CPUs' NUMA node, 1 GiB aligned where possible (default: slice.memory of the "
                        "config file)")
    p.add_argument("--numa-node", type=_node, metavar="K",
                   help="take CPUs and memory from NUMA node K (default: the lowest node where they fit)")
    p.add_argument("--name", metavar="NAME",
                   help="the slice's name in the ledger (default: slice-<first CPU>); booting a name that exists "
                        "with the same shape relaunches it")
    p.add_argument("--ledger", type=Path, metavar="PATH", help=LEDGER_HELP)


def request_from(args, size: int, base: int | None) -> Request:
    return Request(mem_size=size, ncpus=args.ncpus, cpus=tuple(args.cpus) if args.cpus else None,
                   mem_base=base, node=args.numa_node, name=args.name)


def _machine(live: bool, root: Path):
    """The machine to read low-memory slot records from (root only), else None."""
    return machine_for(live, root) if not live or os.geteuid() == 0 else None


# -- coreslice plan -------------------------------------------------------------------------------

PLAN_HELP = """\
Choose CPUs and a memory range for a slice, on one NUMA node, that no slice of this host boot
holds (per the ledger and the low-memory slot records), and print the choice.  Nothing is
reserved or written: `coreslice boot` with the same options makes the same choice (unless
another slice is launched in between).
"""


def _cmd_plan(args) -> int:
    # What boot checks of these flags (request.py), plan checks too: a name with a newline
    # would be printed back, and boot with the same flags would refuse it.
    check_name(args.name)
    devices = []
    for d in args.devices:
        addr = normalize_pci_address(d)
        if addr is None:
            raise UsageError(f"--device {d!r} is not a PCI address; write SEGMENT:BUS:DEVICE.FUNCTION, "
                             "e.g. 0000:21:00.0")
        devices.append(addr)
    args.devices = devices
    args.ncpus, args.memory = slice_defaults(args.cpus, args.ncpus, args.memory, configmod.load(args.config))
    size, base = parse_memory(args.memory)
    live = args.host_root.resolve() == Path("/")
    host = discover(args.host_root)
    ledger = open_ledger(args.ledger, host, readonly=True)
    machine = _machine(live, args.host_root)
    held = held_resources(host, ledger.holding(), slot_records(host, machine))
    p = place(host, request_from(args, size, base), held)
    # What boot would refuse for these CPUs and memory, plan refuses too (plan/boot.py).
    check_resources(p.cpus, p.mem_base, p.mem_size, host)
    if p.relaunch is None:
        ledger.check(SliceRecord(name=args.name or f"slice-{p.cpus[0]}", cpus=tuple(p.cpus),
                                 apic_ids=tuple(p.apic_ids), mem_base=p.mem_base, mem_size=p.mem_size))
    free = free_resources(host, held)
    if args.json:
        print(json.dumps({"ok": True, "placement": p.to_json(), "devices": args.devices,
                          "free": [f.to_json() for f in free], "ledger": str(ledger.path)}, indent=2))
        return 0
    node = f"node {p.node}: " if p.node is not None else ""
    again = f" (the resources of slice '{p.relaunch}': a relaunch)" if p.relaunch else ""
    print(f"{node}CPUs {format_cpu_list(p.cpus)} (APIC IDs {','.join(map(str, p.apic_ids))}), "
          f"{format_size(p.mem_size)}@0x{p.mem_base:x}{again}")
    extra = "".join(f" --device {d}" for d in args.devices)
    print(f"boot it with: coreslice boot --cpus {format_cpu_list(p.cpus)} "
          f"--memory {format_size(p.mem_size)}@0x{p.mem_base:x}{extra} --kernel ... --console ...")
    return 0


# -- coreslice list -------------------------------------------------------------------------------

def _clock(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _row(r: SliceRecord, boot_id: str) -> tuple[str, ...]:
    t = r.times
    since = t.get("ended_at") or t.get("running_at") or t.get("launched_at") or t.get("reserved_at")
    state = r.state or "?"
    if r.boot_id != boot_id:
        state += " (earlier boot)"
    elif explain(r):
        state += f" (launcher died{', ' + r.phase if r.phase else ''})"
    return (r.name, state, format_cpu_list(list(r.cpus)), ",".join(map(str, r.apic_ids)),
            f"{format_size(r.mem_size)}@0x{r.mem_base:x}", f"0x{r.low_slot:x}" if r.low_slot is not None else "-",
            r.console or "-", ",".join(r.devices) or "-", _clock(since))


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _cmd_list(args) -> int:
    live = args.host_root.resolve() == Path("/")
    host = discover(args.host_root)
    ledger = open_ledger(args.ledger, host, readonly=True)
    machine = _machine(live, args.host_root)
    holding = ledger.holding()
    records = slot_records(host, machine)
    held = held_resources(host, holding, records)
    free = free_resources(host, held)
    shown = ledger.slices(history=True) if args.all else holding
    unrecorded = held[len(holding):]  # held_resources lists the ledger rows first
    if args.json:
        print(json.dumps({
            "ok": True, "ledger": str(ledger.path), "boot_id": host.boot_id,
            "slices": [{**r.to_json(), "note": explain(r) if r.boot_id == host.boot_id else None} for r in shown],
            "unrecorded": [{"name": h.name, "cpus": sorted(h.cpus), "memory": h.mem.to_json()} for h in unrecorded],
            "free": [f.to_json() for f in free],
        }, indent=2))
        return 0
    print(f"ledger {ledger.path} (host boot {host.boot_id})")
    if shown:
        head = ("NAME", "STATE", "CPUS", "APIC IDS", "MEMORY", "SLOT", "CONSOLE", "DEVICES", "SINCE")
        print(_table([head, *(_row(r, host.boot_id) for r in shown)]))
        for r in shown:
            note = explain(r) if r.boot_id == host.boot_id else None
            if note:
                print(f"  {r.name}: {note}")
    else:
        print("no slices in this host boot")
    for h in unrecorded:
        print(f"not in the ledger, found in low memory: {h.name}, {format_size(h.mem.size)}@0x{h.mem.start:x}")
    print("free:")
    for f in free:
        mem = ", ".join(f"0x{r.start:x}-0x{r.end - 1:x} ({format_size(r.size)})" for r in f.memory) or "none"
        print(f"  node {f.node}: CPUs {format_cpu_list(f.cpus) or 'none'}; memory {mem}")
    return 0


# -- coreslice stop / restart ----------------------------------------------------------------------

def _acting_on_live_host(args, what: str) -> bool:
    live = args.host_root.resolve() == Path("/")
    if not live and os.environ.get(FAKE_MACHINE_ENV) != "1":
        raise UsageError(f"--host-root describes another machine; {what} acts on the live host only: drop --host-root")
    if live and os.geteuid() != 0:
        raise UsageError(f"coreslice {what} must run as root (it resets devices, sends INIT IPIs and writes "
                         "physical memory); use sudo")
    return live


def _cmd_stop(args) -> int:
    from coreslice.launch.session import stderr_progress, stop

    live = _acting_on_live_host(args, "stop")
    host = discover(args.host_root)
    ledger = open_ledger(args.ledger, host, readonly=True)  # stop() writes only once it stops one
    machine = machine_for(live, args.host_root)
    assert machine is not None
    out = stop(args.name, host=host, machine=machine, ledger=ledger,
               progress=(lambda _m: None) if args.json else stderr_progress,
               scrub=not args.no_scrub, return_devices=args.return_devices)
    if args.json:
        print(json.dumps({"ok": True, **out.to_json(), "ledger": str(ledger.path)}, indent=2))
        return 0
    row = out.slice
    for w in out.warnings:
        print(f"coreslice: warning: {w}", file=sys.stderr)
    scrubbed = f", {format_size(out.scrubbed_bytes)} scrubbed in {out.scrub_s:.2f} s" if out.scrubbed_bytes else \
        " (not scrubbed: --no-scrub)"
    print(f"slice '{row.name}' stopped: {len(out.devices)} PCI function(s) quiet, CPUs "
          f"{format_cpu_list(list(row.cpus))} parked, {format_size(row.mem_size)}@0x{row.mem_base:x} free{scrubbed}")
    return 0


def newest_of_any_boot(ledger, name: str) -> SliceRecord | None:
    """The newest row of ``name`` of any host boot (vm --like, native-setup --like: the baselines
    run in other boots than the slice)."""
    rows = [r for r in ledger.slices(history=True) if r.name == name]
    return rows[-1] if rows else None  # rows come oldest first


def latest(ledger, host, name: str) -> SliceRecord | None:
    """The newest row of ``name`` in this host boot (held or not)."""
    rows = [r for r in ledger.slices(history=True) if r.name == name and r.boot_id == host.boot_id]
    return rows[-1] if rows else None


def restart_argv(row: SliceRecord, ledger_arg: Path | None, as_json: bool) -> list[str]:
    """`coreslice boot` as recorded, on the very CPUs and memory the slice had."""
    if row.request is None:
        raise UsageError(f"slice '{row.name}' was recorded without its boot request (by an older coreslice); "
                         "boot it again with coreslice boot ...")
    argv = ["boot", *row.request, "--cpus", format_cpu_list(list(row.cpus)),
            "--memory", f"{format_size(row.mem_size)}@0x{row.mem_base:x}", "--name", row.name]
    if ledger_arg is not None:
        argv += ["--ledger", str(ledger_arg)]
    return argv + (["--json"] if as_json else [])


def _cmd_restart(args) -> int:
    from coreslice.cli import build_parser
    from coreslice.launch.session import stderr_progress, stop

    live = _acting_on_live_host(args, "restart")
    host = discover(args.host_root)
    ledger = open_ledger(args.ledger, host, readonly=True)
    row = latest(ledger, host, args.name)
    if row is None:
        raise UsageError(f"no slice named '{args.name}' in this host boot (ledger {ledger.path}); see coreslice list --all")
    argv = restart_argv(row, args.ledger, args.json)
    boot_args = build_parser().parse_args(argv)  # a recorded request that no longer parses: refused here
    progress = (lambda _m: None) if args.json else stderr_progress
    machine = machine_for(live, args.host_root)
    assert machine is not None
    stopped = None
    if row.state in ("reserved", "launching", "running", "failed"):
        # No scrub here: the boot scrubs the same ranges right before writing.
        stopped = stop(args.name, host=host, machine=machine, ledger=ledger, progress=progress, scrub=False)
    if args.host_root.resolve() != Path("/"):
        boot_args.host_root = args.host_root
    try:
        return boot_args.func(boot_args)
    except BaseException:
        if stopped is not None:  # keep stop's promise: nothing of the slice stays in its memory
            _scrub_if_unheld(row, host, ledger, machine, progress)
        raise


def _scrub_if_unheld(row: SliceRecord, host, ledger, machine, progress) -> None:
    """After a restart whose boot failed: zero the stopped slice's memory, unless someone holds
    it now (a concurrent launch took the freed range, or the failed boot itself holds it with a
    CPU that may run).  Its CPUs get INIT first: a failed boot may have woken one."""
    from coreslice.launch import scrub as scrubbing
    from coreslice.launch.session import boot_cpu_apic
    from coreslice.machine import lapic

    for other in ledger.holding():
        if other.conflict_with(row) or other.same_resources(row):
            print(f"coreslice: warning: not scrubbing {format_size(row.mem_size)}@0x{row.mem_base:x}: "
                  f"slice '{other.name}' ({other.state}) holds it now", file=sys.stderr)
            return
    try:
        lapic.init_cpus(boot_cpu_apic(host, machine, host.apic_mode or "xapic"), list(row.apic_ids))
        scrubbing.scrub(machine.mem, scrubbing.ranges(row.mem_base, row.mem_size, row.low_slot), progress)
    except CoresliceError as e:
        print(f"coreslice: warning: the stopped slice's memory was not scrubbed: {e}", file=sys.stderr)


def register(sub) -> None:
    p = sub.add_parser("plan", help="choose CPUs and memory for a slice without booting it",
                       description=PLAN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  coreslice plan --ncpus 2 --memory 1G --numa-node 1")
    add_placement_args(p)
    add_config_arg(p)
    p.add_argument("--device", dest="devices", action="append", default=[], metavar="ADDR",
                   help="a PCI function for the slice (echoed; placement does not use it yet)")
    p.add_argument("--host-root", type=root_arg, default=Path("/"), metavar="DIR", help=HOST_ROOT_HELP)
    p.add_argument("--json", action="store_true", help="print the choice and what is free as JSON")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("list", help="slices of this host boot and what is still free",
                       description="Show the slices the ledger records for this host boot (name, state, "
                                   "CPUs, memory, low-memory slot, console, devices) and the free CPUs and "
                                   "memory of each NUMA node.")
    p.add_argument("--all", action="store_true", help="also show ended slices and those of earlier host boots")
    p.add_argument("--ledger", type=Path, metavar="PATH", help=LEDGER_HELP)
    p.add_argument("--host-root", type=root_arg, default=Path("/"), metavar="DIR", help=HOST_ROOT_HELP)
    p.add_argument("--json", action="store_true", help="print slices and free resources as JSON")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("stop", help="stop a slice: quiet its devices, park its CPUs, scrub and free its memory",
                       description="Stop a slice without rebooting the host: turn off Bus Master Enable, MSI and "
                                   "MSI-X of each of its PCI functions and reset each alone (FLR, else a secondary "
                                   "bus reset of its bridge, where the host kernel offers one), send INIT to its "
                                   "CPUs (they return to wait-for-SIPI), zero its RAM and low-memory slot, and mark "
                                   "it stopped in the ledger, so its CPUs, memory and devices can be given to "
                                   "another slice.  A slice whose launcher was killed mid-way is recovered the "
                                   "same way.",
                       epilog="example:\n  coreslice stop web1 --return-devices")
    p.add_argument("name", metavar="NAME", help="the slice's name (see coreslice list)")
    p.add_argument("--no-scrub", action="store_true",
                   help="leave the slice's memory as it is (faster on large slices; the next launch there "
                        "scrubs it anyway, but until then its data stays in RAM)")
    p.add_argument("--return-devices", action="store_true",
                   help="bind its PCI functions to their host drivers again afterwards")
    p.add_argument("--ledger", type=Path, metavar="PATH", help=LEDGER_HELP)
    p.add_argument("--host-root", type=root_arg, default=Path("/"), metavar="DIR",
                   help=f"a captured host tree (tests only, with {FAKE_MACHINE_ENV}=1)")
    p.add_argument("--json", action="store_true", help="print the stopped slice and what was done as JSON")
    p.set_defaults(func=_cmd_stop)

    p = sub.add_parser("restart", help="stop a slice and boot it again with its recorded request",
                       description="Stop the slice (as coreslice stop, its memory scrubbed by the boot that "
                                   "follows) and boot it again with the arguments its launch recorded in the "
                                   "ledger, on the same CPUs and memory.  A stopped, failed or crashed slice is "
                                   "booted again the same way.")
    p.add_argument("name", metavar="NAME", help="the slice's name (see coreslice list --all)")
    p.add_argument("--ledger", type=Path, metavar="PATH", help=LEDGER_HELP)
    p.add_argument("--host-root", type=root_arg, default=Path("/"), metavar="DIR",
                   help=f"a captured host tree (tests only, with {FAKE_MACHINE_ENV}=1)")
    p.add_argument("--json", action="store_true", help="print the boot's JSON")
    p.set_defaults(func=_cmd_restart)
