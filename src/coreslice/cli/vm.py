"""``coreslice vm``: a QEMU/KVM VM with a slice's resources, the baseline a slice is compared with
(issue 13 section 1).  So far only ``--dry-run``: the QEMU command line and the pinning plan.

Thin: the slice's resources come from the ledger (``--like NAME``) or from boot's flags, the host
from discovery; vm/plan.py decides.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from coreslice.cli.host import root_arg
from coreslice.cli.slices import HOST_ROOT_HELP, LEDGER_HELP, cpu_list_arg
from coreslice.errors import UsageError
from coreslice.host.consoles import normalize_pci_address
from coreslice.host.snapshot import discover
from coreslice.host.sysfs import format_cpu_list
from coreslice.launch.session import open_ledger
from coreslice.request import check_cmdline, check_name
from coreslice.units import format_size, parse_memory
from coreslice.vm.plan import HUGEPAGE_CHOICES, VmResources, guest_cmdline, plan_vm

# Where a VM's serial log and QMP socket go by default: /run is emptied at reboot, like the VM.
RUN_DIR = Path("/run/coreslice/vm")

VM_HELP = """\
Plan a QEMU/KVM VM with the resources of a slice, to compare the slice against: one vCPU per CPU
of the slice, each pinned to that host CPU, memory bound to the same NUMA node (huge pages of
--hugepages, preallocated), the same PCI functions through vfio-pci, the same kernel, initrd and
command line, the serial console written to a file.  Take the resources of a slice the ledger
recorded (--like NAME, its newest row, of any host boot: the host runs VMs in another boot
profile) or give them as for coreslice boot.

Only --dry-run exists so far: it prints the QEMU command line and the pinning plan.
"""


def register(sub) -> None:
    p = sub.add_parser("vm", help="plan a QEMU/KVM VM with a slice's resources (--dry-run only so far)",
                       description=VM_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  coreslice vm --like web1 --dry-run --hugepages 1G\n"
                              "  coreslice vm --kernel vmlinuz --initrd initrd.img --cpus 2-3 --memory 2G --dry-run\n"
                              "exit status: 0 plan printed, 2 bad input (or no --dry-run)")
    p.add_argument("--like", metavar="NAME", help="the resources of the slice NAME (newest ledger row of that name)")
    p.add_argument("--kernel", type=Path, metavar="PATH", help="the guest kernel (bzImage), without --like")
    p.add_argument("--initrd", type=Path, metavar="PATH", help="the guest initramfs, without --like")
    p.add_argument("--cmdline", metavar="STR",
                   help="guest kernel parameters (console=ttyS0 is appended); with --like, replaces the slice's")
    p.add_argument("--cpus", type=cpu_list_arg, metavar="LIST", help="host CPUs, one vCPU pinned to each, without --like")
    p.add_argument("--memory", metavar="SIZE[@BASE]",
                   help="guest RAM, without --like; @BASE only checks that the range is on the CPUs' node")
    p.add_argument("--device", dest="devices", action="append", default=[], metavar="PCI-ADDR",
                   help="a PCI function passed through with vfio-pci (repeatable), without --like")
    p.add_argument("--hugepages", choices=HUGEPAGE_CHOICES, default="2M",
                   help="back guest RAM with huge pages of this size on the node, or 'none' (anonymous memory); "
                        "default 2M, which any host can reserve at run time")
    p.add_argument("--serial-log", type=Path, metavar="FILE",
                   help=f"where the guest's serial console goes (default: {RUN_DIR}/NAME/serial.log)")
    p.add_argument("--dry-run", action="store_true", help="print the QEMU command line and the pinning plan only")
    p.add_argument("--ledger", type=Path, metavar="PATH", help=LEDGER_HELP)
    p.add_argument("--host-root", type=root_arg, default=Path("/"), metavar="DIR", help=HOST_ROOT_HELP)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_vm)


def _devices(given) -> tuple[str, ...]:
    out = []
    for d in given:
        addr = normalize_pci_address(d)
        if addr is None:
            raise UsageError(f"--device {d!r} is not a PCI address; write SEGMENT:BUS:DEVICE.FUNCTION, e.g. 0000:21:00.0")
        out.append(addr)
    return tuple(out)


def _like(args, host) -> VmResources:
    given = [f for f, v in (("--kernel", args.kernel), ("--initrd", args.initrd), ("--cpus", args.cpus),
                            ("--memory", args.memory), ("--device", args.devices)) if v]
    if given:
        raise UsageError(f"--like takes the slice's resources; drop {', '.join(given)}, or drop --like")
    ledger = open_ledger(args.ledger, host, readonly=True)
    rows = ledger.slices(history=True)
    mine = [r for r in rows if r.name == args.like]
    if not mine:
        known = sorted({r.name for r in rows})
        fix = (f"(known: {', '.join(known)}); give one of those to --like" if known else
               "(it records no slices); boot the slice first")
        raise UsageError(f"no slice named '{args.like}' in the ledger {ledger.path} {fix}, or give the resources "
                         "as for coreslice boot")
    row = mine[-1]  # rows come oldest first
    if not row.kernel:
        raise UsageError(f"slice '{row.name}' was recorded without its kernel; give --kernel etc. instead of --like")
    return VmResources(kernel=Path(row.kernel), initrd=Path(row.initrd) if row.initrd else None, cpus=row.cpus,
                       mem_size=row.mem_size, mem_base=row.mem_base, devices=row.devices, name=row.name,
                       cmdline=check_cmdline(args.cmdline) if args.cmdline is not None else guest_cmdline(row.cmdline))


def _flags(args) -> VmResources:
    missing = [f for f, v in (("--kernel PATH", args.kernel), ("--cpus LIST", args.cpus),
                              ("--memory SIZE", args.memory)) if not v]
    if missing:
        raise UsageError(f"no slice to copy: give --like NAME, or {', '.join(missing)} as for coreslice boot")
    size, base = parse_memory(args.memory)
    return VmResources(kernel=args.kernel, initrd=args.initrd, cpus=tuple(args.cpus), mem_size=size, mem_base=base,
                       cmdline=check_cmdline(args.cmdline or ""), devices=_devices(args.devices),
                       name=f"vm-{min(args.cpus)}")


def cmd_vm(args) -> int:
    if not args.dry_run:
        raise UsageError("launching the VM is not implemented yet; use --dry-run to print its QEMU command line "
                         "and pinning plan")
    if args.like is not None:
        check_name(args.like)
    host = discover(args.host_root)
    res = _like(args, host) if args.like is not None else _flags(args)
    run = RUN_DIR / res.name
    plan = plan_vm(host, res, hugepage_size=args.hugepages, serial_log=args.serial_log or run / "serial.log",
                   qmp_socket=run / "qmp.sock")
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
        return 0
    print(shlex.join(plan.argv))
    print(f"pinning (NUMA node {plan.numa_node}): "
          + ", ".join(f"vCPU {v} -> CPU {c}" for v, c in plan.pinning.items()))
    if plan.hugepages:
        h = plan.hugepages
        print(f"huge pages: {h.count} x {h.size} on node {h.node} ({format_size(res.mem_size)}), "
              f"preallocated; CPUs {format_cpu_list(sorted(res.cpus))}")
    else:
        print(f"huge pages: none ({format_size(res.mem_size)} of ordinary memory bound to node {plan.numa_node})")
    return 0
