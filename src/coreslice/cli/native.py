"""``coreslice native-setup --like NAME [--undo]``: the native baseline's devices (issue 13 section 2).

Thin: plan/native.py finds the slice and compares the host's boot with the native-eval profile,
plan/vfs.py checks the VFs, launch/native.py makes the changes and keeps their undo.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from coreslice import config as configmod
from coreslice import declared
from coreslice.cli.slices import LEDGER_HELP, newest_of_any_boot
from coreslice.cli.sriov import held_functions
from coreslice.errors import LaunchError, UsageError
from coreslice.host.snapshot import discover
from coreslice.launch import native as effects
from coreslice.launch.session import open_ledger
from coreslice.machine import for_host as machine_for
from coreslice.plan import native as plan
from coreslice.plan import vfs as vfplan
from coreslice.request import check_name

# Where --undo records go, and the host discovered; tests point them elsewhere.
STATE_DIR = effects.STATE_DIR
HOST_ROOT = Path("/")

HELP = """\
Make this host look like the slice NAME for a native baseline (the prototype's
setup_native_eval.sh): boot the host with the native-eval profile on the slice's CPU count and
memory (coreslice host configure --profile native-eval --host-cpus N --host-mem SIZE), then run
native-setup to give it the slice's own SR-IOV VFs, bound to host drivers:

  NIC VF   enabled as for the slice (driver autoprobe off), the slice's MAC, bound to its host VF
           driver; its interface gets the slice's address (--address, else the static address
           of the slice's image) and is set up
  NVMe VF  its secondary controller online with the slice's queue resources, bound to nvme: the
           namespace the slice's disk is on (coreslice image install) shows as a block device

The slice is the ledger's newest row of that name (of any host boot), else its declaration
(/etc/coreslice/slices/NAME.toml, or --slices-dir).  Every check runs first (exit 2, nothing
changed); a failure undoes what was done (exit 1).  What was done is recorded in
/run/coreslice/native/NAME.json; --undo replays it backwards.  Whole functions (--device) need
nothing: the native host drives them with its own drivers.
"""


def register(sub) -> None:
    p = sub.add_parser("native-setup", help="give this host a slice's VFs, bound to host drivers (native baseline)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  coreslice native-setup --like web1 --address 10.99.1.2/24\n"
                              "  coreslice native-setup --like web1 --undo\n"
                              "exit status: 0 done, 1 a change failed (what was done is undone), 2 bad input "
                              "(nothing changed)")
    p.add_argument("--like", required=True, metavar="NAME", help="the slice whose devices the host takes")
    p.add_argument("--address", metavar="ADDR/LEN",
                   help="IPv4 address for the NIC VF's interface (default: the slice image's static address)")
    p.add_argument("--undo", action="store_true", help="undo what native-setup --like NAME did, newest change first")
    p.add_argument("--check", action="store_true", help="run every check and say what would be done; change nothing")
    p.add_argument("--any-profile", action="store_true",
                   help="set up even though the host is not booted on the slice's CPUs and memory (to try the "
                        "setup; measurements then compare nothing)")
    p.add_argument("--wait", type=float, default=10.0, metavar="S",
                   help="how long to wait for the VF's interface or block devices (default: 10)")
    p.add_argument("--ledger", type=Path, metavar="PATH", help=LEDGER_HELP)
    p.add_argument("--slices-dir", type=Path, metavar="DIR",
                   help=f"where slices are declared (default: ${declared.ENV}, else {declared.DEFAULT_DIR})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_native_setup)


def _progress(args):
    return (lambda _m: None) if args.json else (lambda m: print(f"coreslice native-setup: {m}", file=sys.stderr,
                                                                flush=True))


def find_slice(name: str, ledger, slices_dir: Path | None) -> plan.NativeSlice:
    """The ledger's newest row named ``name`` (any host boot), else its declaration."""
    from coreslice.cli import build_parser

    row = newest_of_any_boot(ledger, name)
    if row is not None:
        if row.request is None:
            raise UsageError(f"slice '{name}' was recorded without its boot request (by an older coreslice); "
                             "declare it in the slices directory, or boot it once with this coreslice")
        try:
            args = build_parser().parse_args(["boot", *row.request])
        except UsageError as e:
            raise UsageError(f"slice '{name}''s recorded request no longer parses ({e}); declare it instead") from None
        return plan.from_args(name, f"ledger row {row.id} (host boot {row.boot_id})", args, ncpus=len(row.cpus),
                              mem_size=row.mem_size, kernel=row.kernel)
    path = declared.slices_dir(slices_dir) / f"{name}{declared.SUFFIX}"
    if path.is_file():
        d = declared.load(path)
        return plan.from_args(name, str(path), d.args, ncpus=None, mem_size=None,
                              kernel=str(d.args.kernel) if d.args.kernel else None)
    raise UsageError(f"no slice named '{name}' in the ledger {ledger.path} or in {path}; boot or declare it first")


def _kernel_warning(sl: plan.NativeSlice) -> str | None:
    if not sl.kernel or not Path(sl.kernel).is_file():
        return None
    from coreslice.boot.bzimage import parse_bzimage
    try:
        release = parse_bzimage(sl.kernel).version_string.split()[0]
    except Exception:
        return None
    if release != os.uname().release:
        return (f"the host runs kernel {os.uname().release}, the slice {release} ({sl.kernel}): boot the host with "
                "the slice's kernel for a like-for-like baseline")
    return None


def _setup(args, sl: plan.NativeSlice, host, ledger, path: Path) -> int:
    gaps = plan.profile_gaps(host.cmdline, sum(1 for c in host.cpus if c.online), sl)
    if gaps and not args.any_profile:
        raise UsageError(f"this host is not booted as the native baseline of slice '{sl.name}': {'; '.join(gaps)}; "
                         f"run {plan.profile_fix(sl)} (or give --any-profile to set up anyway)")
    if not sl.vfs:
        raise UsageError(f"slice '{sl.name}' ({sl.source}) has no SR-IOV VFs, so there is nothing to set up: its "
                         "whole functions, if any, are the host's own devices in a native boot")
    nics = [v for v in sl.vfs if v.kind == "nic"]
    ip = plan.check_address(args.address) if args.address else sl.address
    if args.address and len(nics) != 1:
        raise UsageError(f"--address goes with exactly one NIC VF; slice '{sl.name}' has {len(nics)}")
    if ip and len(nics) > 1:
        raise UsageError(f"slice '{sl.name}' has {len(nics)} NIC VFs and its image one address ({ip}); "
                         "give --address to the one NIC VF of a slice, or set addresses by hand")
    if path.exists():
        raise UsageError(f"native-setup --like {sl.name} is already in place ({path}); undo it first "
                         f"(coreslice native-setup --like {sl.name} --undo)")
    warnings = [w for w in (_kernel_warning(sl),) if w]
    if gaps:
        warnings.append(f"not the native-eval profile ({'; '.join(gaps)}): figures measured now compare nothing")
    if nics and ip is None:
        warnings.append("no address for the NIC VF (its image has none; give --address ADDR/LEN)")
    cfg = configmod.load(sl.config)
    machine = machine_for(True)
    assert machine is not None
    ops = machine.sriov
    held = {**held_functions(ledger), **effects.held_vfs(path.parent)}
    checked = vfplan.check(list(sl.vfs), ops, cfg.sriov, held)
    namespaces: dict[tuple[str, int], list[int]] = {}
    for ns in ledger.namespaces():
        namespaces.setdefault((ns["pf"], ns["vf_index"]), []).append(ns["nsid"])
    for c in checked:
        if c.req.kind == "nvme" and not namespaces.get((c.req.pf, c.req.index)):
            warnings.append(f"no namespace is recorded for NVMe VF {c.req.index} of {c.req.pf} (coreslice image "
                            "install gives it one): its controller may show no disk")
    out = {"ok": True, "slice": sl.to_json(), "profile": {"native_eval": not gaps, "gaps": gaps},
           "warnings": warnings, "state_file": str(path)}
    if args.check:
        out.update(checked_only=True, vfs=[{"kind": c.req.kind, "pf": c.req.pf, "index": c.req.index,
                                            "address": c.vf, "mac": c.mac} for c in checked])
        return _print(args, out, "checks passed; nothing changed")
    from coreslice.nvme.ops import udev_settle
    state = effects.setup(sl.name, host.boot_id, checked, ops, ip=ip, namespaces=namespaces,
                          progress=_progress(args), wait=args.wait, settle=lambda: udev_settle(args.wait))
    try:
        effects.save_state(state, path)
    except BaseException as e:  # no record, no --undo: take the changes back now
        done, left = effects.undo(state, ops)
        why = f"writing {path} failed ({e})" if isinstance(e, Exception) else "interrupted"
        msg = (f"{why}; undid all {len(done)} changes" if not left else
               f"{why}; undid {len(done)} changes, could not undo {left[-1]['what']} ({left[-1]['error']}) "
               "and older ones: fix these by hand")
        if isinstance(e, Exception):
            raise LaunchError(msg) from e
        print(f"coreslice native-setup: {msg}", file=sys.stderr)
        raise
    out.update(checked_only=False, vfs=[v.to_json() for v in state.vfs], changes=len(state.undo))
    lines = []
    for v in state.vfs:
        if v.kind == "nic":
            lines.append(f"NIC VF {v.index} of {v.pf}: {v.address} ({v.driver}) is {v.ifname}, MAC {v.mac}"
                         + (f", {v.ip}" if v.ip else ""))
        else:
            lines.append(f"NVMe VF {v.index} of {v.pf}: {v.address} ({v.driver}), "
                         + (", ".join(f"/dev/{b}" for b in v.block_devices) or "no block device"))
    lines.append(f"undo with: coreslice native-setup --like {sl.name} --undo")
    return _print(args, out, "\n".join(lines), warnings)


def _undo(args, host, path: Path) -> int:
    try:
        state = effects.load_state(path)
    except FileNotFoundError:
        raise UsageError(f"native-setup --like {args.like} is not in place (no {path}); nothing to undo") from None
    if state.boot_id != host.boot_id:
        raise UsageError(f"{path} is from an earlier host boot, whose VFs and addresses ended with it; remove the "
                         "file, there is nothing to undo")
    machine = machine_for(True)
    assert machine is not None
    done, left = effects.undo(state, machine.sriov, _progress(args))
    if left:
        state.undo = left
        effects.save_state(state, path)  # what is left, for another --undo after a fix
    else:
        path.unlink()
    out = {"ok": not left, "undone": done, "left": left, "state_file": str(path)}
    text = (f"undid {len(done)} changes of native-setup --like {args.like}" if not left else
            f"undid {len(done)} changes, then could not undo {left[-1]['what']} ({left[-1]['error']}); "
            f"{len(left)} changes are left in {path}: fix the cause and run --undo again")
    if left and not args.json:
        print(f"coreslice: error: {text}", file=sys.stderr)
        return 1
    _print(args, out, text)
    return 0 if not left else 1


def _print(args, out: dict, text: str, warnings=()) -> int:
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for w in warnings:
            print(f"coreslice: warning: {w}", file=sys.stderr)
        print(text)
    return 0


def cmd_native_setup(args) -> int:
    check_name(args.like)
    if not args.check and os.geteuid() != 0:
        raise UsageError("native-setup changes sysfs, netlink and NVMe controllers: run it as root (or use --check)")
    host = discover(HOST_ROOT)
    path = effects.state_path(args.like, STATE_DIR)
    if args.undo:
        if args.check or args.address or args.any_profile:
            raise UsageError("--undo replays the record; drop --check, --address and --any-profile")
        return _undo(args, host, path)
    ledger = open_ledger(args.ledger, host, readonly=True)
    return _setup(args, find_slice(args.like, ledger, args.slices_dir), host, ledger, path)
