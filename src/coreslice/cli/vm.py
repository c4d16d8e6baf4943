"""``coreslice vm``: a QEMU/KVM VM with a slice's resources, the baseline a slice is compared with
(issue 13 section 1): ``--dry-run`` prints the QEMU command line and the pinning plan; without it
the VM runs in the foreground until it ends, and everything it took is given back.

Thin: the slice's resources come from the ledger (``--like NAME``) or from boot's flags, the host
from discovery; vm/plan.py decides, _preflight checks what the launch needs before it touches
anything, vm/launch.py runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from coreslice.cli.host import root_arg
from coreslice.cli.slices import HOST_ROOT_HELP, LEDGER_HELP, cpu_list_arg, newest_of_any_boot
from coreslice.errors import UsageError
from coreslice.vm import hugepages as hp
from coreslice.vm import vfio
from coreslice.vm.launch import PID_FILE, run_vm
from coreslice.host.consoles import normalize_pci_address
from coreslice.host.snapshot import discover
from coreslice.host.sysfs import format_cpu_list
from coreslice.launch.session import open_ledger
from coreslice.request import check_cmdline, check_name
from coreslice.units import format_size, parse_memory
from coreslice.vm.plan import ACCEL_CPU, HUGEPAGE_CHOICES, QEMU, VmPlan, VmResources, guest_cmdline, plan_vm

# Where a VM's serial log and QMP socket go by default: /run is emptied at reboot, like the VM.
RUN_DIR = Path("/run/coreslice/vm")
# The machine a launch acts on (its /dev and /sys); tests point it at a synthetic tree.
LIVE_ROOT = Path("/")

VM_HELP = """\
Run (or plan) a QEMU/KVM VM with the resources of a slice, to compare the slice against: one
vCPU per CPU of the slice, each pinned to that host CPU, memory bound to the same NUMA node (huge
pages of --hugepages, preallocated), the same PCI functions through vfio-pci, the same kernel,
initrd and command line, the serial console written to a file.  Take the resources of a slice
the ledger recorded (--like NAME, its newest row, of any host boot: the host runs VMs in another
boot profile) or give them as for coreslice boot.

--dry-run prints the QEMU command line and the pinning plan.  Without it the VM runs in the
foreground: huge pages are reserved on the node, the functions bound to vfio-pci, QEMU started
paused, each vCPU thread pinned, the guest let run; when it powers off (or on Ctrl-C / SIGTERM)
QEMU is stopped and the functions and huge pages are given back.  The host should be in its VM
profile (coreslice host check --profile vm-host says what is missing).
"""


def register(sub) -> None:
    p = sub.add_parser("vm", help="run (or plan, --dry-run) a QEMU/KVM VM with a slice's resources",
                       description=VM_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  coreslice vm --like web1 --dry-run --hugepages 1G\n"
                              "  coreslice vm --kernel vmlinuz --initrd initrd.img --cpus 2-3 --memory 2G --dry-run\n"
                              "exit status: 0 plan printed or the VM ran and exited 0, 1 the launch or QEMU "
                              "failed, 2 bad input (nothing touched)")
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
    p.add_argument("--accel", choices=tuple(ACCEL_CPU), default="kvm",
                   help="kvm (default: the baseline) or tcg (software emulation, only to try the launcher on a "
                        "host without KVM; its figures compare nothing)")
    p.add_argument("--dry-run", action="store_true", help="print the QEMU command line and the pinning plan only")
    p.add_argument("--ledger", type=Path, metavar="PATH", help=LEDGER_HELP)
    p.add_argument("--host-root", type=root_arg, default=Path("/"), metavar="DIR", help=HOST_ROOT_HELP)
    p.add_argument("--json", action="store_true",
                   help="print the plan (--dry-run) or, after the VM ends, what the run did, as JSON")
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
    row = newest_of_any_boot(ledger, args.like)
    if row is None:
        known = sorted({r.name for r in ledger.slices(history=True)})
        fix = (f"(known: {', '.join(known)}); give one of those to --like" if known else
               "(it records no slices); boot the slice first")
        raise UsageError(f"no slice named '{args.like}' in the ledger {ledger.path} {fix}, or give the resources "
                         "as for coreslice boot")
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


def _preflight(plan: VmPlan, res: VmResources, host, args) -> dict[str, int]:
    """Everything a launch needs, checked before the first change (huge pages, driver binding):
    returns each passed-through function's IOMMU group."""
    if args.host_root != Path("/"):
        raise UsageError(f"--host-root {args.host_root} describes another machine; a VM runs only on this one "
                         "(use --dry-run to plan for a captured host)")
    if os.geteuid() != 0:
        raise UsageError("running the VM needs root (huge page pools, vfio-pci binding, pinning); run it with sudo, "
                         "or use --dry-run")
    if shutil.which(QEMU) is None:
        raise UsageError(f"{QEMU} is not installed; apt-get install qemu-system-x86")
    if args.accel == "kvm" and not (LIVE_ROOT / "dev/kvm").exists():
        raise UsageError("no /dev/kvm: KVM is not loaded (modprobe kvm_intel or kvm_amd); coreslice host check "
                         "--profile vm-host lists what the VM host needs")
    offline = [c.cpu for c in host.cpus if c.cpu in res.cpus and not c.online]
    if offline:
        raise UsageError(f"CPUs {format_cpu_list(offline)} are offline on this host (booted for slices?); boot it in "
                         "its VM profile (coreslice host configure --profile vm-host) or give online CPUs")
    for what, path in (("kernel", res.kernel), ("initrd", res.initrd)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"the {what} {path} is not a file; give an existing --{what}")
    if plan.hugepages is not None:
        hp.check(LIVE_ROOT, plan.hugepages)
    pid_file = RUN_DIR / res.name / PID_FILE
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        pass
    else:
        raise UsageError(f"a VM named {res.name} is already running (QEMU pid {pid}, {pid_file}); stop it first "
                         "(kill it or Ctrl-C its coreslice vm)")
    return vfio.check_groups(res.devices, host.pci)


def _launch(plan: VmPlan, res: VmResources, host, args) -> int:
    groups = _preflight(plan, res, host, args)
    run = run_vm(plan, res.name, devices_groups=groups, root=LIVE_ROOT, run_dir=RUN_DIR / res.name,
                 progress=lambda msg: print(f"coreslice vm: {msg}", file=sys.stderr, flush=True))
    ok = run.exit_code == 0
    if args.json:
        print(json.dumps({"ok": ok, **run.to_json(), "serial_log": str(plan.serial_log)}, indent=2))
    else:
        back = ", ".join(f"{a} -> {d['returned_to'] or 'no driver'}" for a, d in run.devices.items())
        print(f"VM {res.name}: ended by {run.ended_by}, QEMU exit {run.exit_code}; console in {plan.serial_log}"
              + (f"; devices back: {back}" if back else ""))
        if not ok:
            print(f"QEMU's own messages: {run.qemu_log}")
    return 0 if ok else 1


def cmd_vm(args) -> int:
    if args.like is not None:
        check_name(args.like)
    host = discover(args.host_root)
    res = _like(args, host) if args.like is not None else _flags(args)
    run = RUN_DIR / res.name
    plan = plan_vm(host, res, hugepage_size=args.hugepages, serial_log=args.serial_log or run / "serial.log",
                   qmp_socket=run / "qmp.sock", accel=args.accel)
    if not args.dry_run:
        return _launch(plan, res, host, args)
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
