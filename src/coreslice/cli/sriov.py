"""``coreslice sriov prepare`` and the SR-IOV part of ``coreslice boot`` (--nic-vf, --nvme-vf)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from coreslice import config as configmod
from coreslice.plan import vfs as sriov
from coreslice.launch import vfprep
from coreslice.machine.sriov import RealOps
from coreslice.errors import UsageError
from coreslice.cli import slices
from coreslice.ledger import Ledger, resolve_path
from coreslice.machine import for_host as machine_for

def add_vf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nic-vf", dest="nic_vfs", action="append", default=[], metavar="PF:INDEX",
                   help="an SR-IOV NIC VF (e.g. 0000:99:00.0:0): enables the PF's VFs once (driver autoprobe "
                        "off), sets the VF's MAC by netlink, unbinds the VF; needs --guest-kernel slice")
    p.add_argument("--nvme-vf", dest="nvme_vfs", action="append", default=[], metavar="PF:INDEX",
                   help="an SR-IOV NVMe VF: before enabling the VFs gives every secondary controller flexible "
                        "queue/interrupt resources (nvme virt-mgmt), then brings VF INDEX's secondary online")
    p.add_argument("--mac", metavar="MAC",
                   help="MAC for the --nic-vf (default: the config's sriov.mac_base + INDEX)")
    slices.add_config_arg(p)


def requests_from(args) -> list[sriov.VfRequest]:
    reqs = [sriov.parse_vf(t, "nic") for t in args.nic_vfs] + [sriov.parse_vf(t, "nvme") for t in args.nvme_vfs]
    return sriov.with_mac(reqs, args.mac)


def held_functions(ledger: Ledger | None) -> dict[str, str]:
    return {f: r.name for r in (ledger.holding() if ledger else []) for f in r.pci_functions()}


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


# -- coreslice sriov prepare ---------------------------------------------------------------------

PREPARE_HELP = """\
Prepare SR-IOV virtual functions for slices without booting anything: the checks and host-side
steps of `coreslice boot --nic-vf/--nvme-vf` (enable the PF's VFs once with driver autoprobe off,
NIC: set the VF's MAC by netlink; NVMe: assign flexible VQ/VI resources to the secondary
controllers before enabling, bring the VF's secondary controller online; unbind the VF).  Every
check runs first (exit 2, nothing changed); a failure after a change undoes all changes (exit 1).
The VFs are not recorded in the ledger (only a booted slice holds them).
"""


def register(sub) -> None:
    sr = sub.add_parser("sriov", help="SR-IOV virtual functions for slices",
                        description="SR-IOV physical functions (see [sriov] in the config) and their VFs.")
    ssub = sr.add_subparsers(dest="sriov_command", required=True, metavar="COMMAND")
    p = ssub.add_parser("prepare", help="enable, configure and unbind VFs (no boot)", description=PREPARE_HELP,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="example: coreslice sriov prepare --nic-vf 0000:99:00.0:0 --nvme-vf 0000:8d:00.0:0 --json")
    add_vf_args(p)
    p.add_argument("--check", action="store_true", help="run the checks only; change nothing")
    p.add_argument("--ledger", type=Path, metavar="PATH", help="ledger to check held VFs against")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args, ops=None) -> int:
    from coreslice.launch.session import stderr_progress

    reqs = requests_from(args)
    if not reqs:
        raise UsageError("nothing to prepare; give --nic-vf PF:INDEX and/or --nvme-vf PF:INDEX")
    cfg = configmod.load(args.config)
    machine = None if args.check else machine_for(True)
    ops = ops or (machine.sriov if machine else RealOps())
    ledger = Ledger(resolve_path(args.ledger), _boot_id(), readonly=True)
    checked = sriov.check(reqs, ops, cfg.sriov, held_functions(ledger))
    progress = (lambda _m: None) if args.json else stderr_progress
    vfs = [] if args.check else vfprep.prepare(checked, ops, progress).vfs
    if args.json:
        print(json.dumps({"ok": True, "checked_only": args.check, "vfs": [v.to_json() for v in vfs],
                          "config": cfg.to_json()}, indent=2))
    else:
        for v in vfs:
            extra = f" MAC {v.mac}" if v.mac else f" secondary controller {v.secondary} online"
            print(f"{v.kind} VF {v.index} of {v.pf}: {v.address}{extra}"
                  f"{', unbound from ' + v.unbound_from if v.unbound_from else ''}")
        if args.check:
            print("checks passed; nothing changed")
    return 0
