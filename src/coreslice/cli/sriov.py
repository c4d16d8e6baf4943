"""``coreslice sriov prepare`` and the SR-IOV part of ``coreslice boot`` (--nic-vf, --nvme-vf)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from coreslice import config as configmod
from coreslice.plan import vfs as sriov
from coreslice.launch import vfprep
from coreslice.machine.sriov import RealOps
from coreslice.errors import UsageError
from coreslice.ledger import Ledger, resolve_path

STOCK_VF_REFUSAL = ("a stock kernel cannot drive an SR-IOV VF: it sees the VF's physical function on the same "
                    "root bus, probes it and resets SR-IOV, which removes the VFs of every slice; use "
                    "--guest-kernel slice (the prototype's kernel with permit_probe_only and pci-vf-as-pf), "
                    "or give the slice a whole function on a root bus of its own with --device")


def add_vf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nic-vf", dest="nic_vfs", action="append", default=[], metavar="PF:INDEX",
                   help="an SR-IOV NIC VF (e.g. 0000:99:00.0:0): enables the PF's VFs once (driver autoprobe "
                        "off), sets the VF's MAC by netlink, unbinds the VF; needs --guest-kernel slice")
    p.add_argument("--nvme-vf", dest="nvme_vfs", action="append", default=[], metavar="PF:INDEX",
                   help="an SR-IOV NVMe VF: before enabling the VFs gives every secondary controller flexible "
                        "queue/interrupt resources (nvme virt-mgmt), then brings VF INDEX's secondary online")
    p.add_argument("--mac", metavar="MAC",
                   help="MAC for the --nic-vf (default: the config's sriov.mac_base + INDEX)")
    add_config_arg(p)


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, metavar="PATH",
                   help=f"coreslice configuration (default: ${configmod.ENV}, else {configmod.DEFAULT_PATH})")


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


@dataclass
class BootVfs:
    """What boot does with VF requests: the prepared VFs and the command-line additions."""

    prep: vfprep.Preparation | None = None
    devices: list[str] = field(default_factory=list)
    pci_extra: str = ""
    cmdline: str = ""

    def undo(self) -> str:
        return vfprep.undo_message(self.prep) if self.prep else "nothing had been changed"


def check_guest_kernel(guest_kernel: str, reqs: list[sriov.VfRequest], devices: list[str], host) -> None:
    """A stock kernel gets whole functions only (never a VF, given as --*-vf or as --device)."""
    if guest_kernel != "stock":
        return
    if reqs:
        raise UsageError(f"{reqs[0].flag} with --guest-kernel stock: {STOCK_VF_REFUSAL}")
    for d in devices:
        from coreslice.plan.pci import normalize
        fn = host.pci.function(normalize(d))
        if fn is not None and fn.physfn:
            raise UsageError(f"--device {fn.address} is an SR-IOV VF of {fn.physfn}; {STOCK_VF_REFUSAL}")


def boot_vfs(args, host, ledger, ops=None, progress=lambda _m: None) -> BootVfs:
    """Check (no change), then, unless a dry run, prepare the VFs.  The caller undoes with
    ``.undo()`` when the boot is refused later."""
    reqs = requests_from(args)
    check_guest_kernel(args.guest_kernel, reqs, args.devices, host)
    if not reqs:
        return BootVfs()
    cfg = configmod.load(args.config)
    ops = ops or RealOps(args.host_root)
    checked = sriov.check(reqs, ops, cfg.sriov, held_functions(ledger))
    out = BootVfs()
    if args.dry_run is not None:  # no change: only VFs that exist already can go into the plan
        vfs = [vfprep.PreparedVf(c.req.kind, c.req.pf, c.req.index, c.vf) for c in checked if c.vf]
    else:
        out.prep = vfprep.prepare(checked, ops, progress)
        vfs = out.prep.vfs
    out.devices = [v.address for v in vfs]
    permit, vf_params = sriov.slice_kernel_params(vfs, [*args.devices] + ([args.console] if ":" in args.console and
                                                                           not args.console.startswith("io:") else []))
    out.pci_extra = f",permit_probe_only={permit}" if permit else ""
    out.cmdline = vf_params
    return out


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
    ops = ops or RealOps()
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
