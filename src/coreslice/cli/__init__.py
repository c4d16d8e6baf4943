"""The coreslice command line: thin argparse front end over the domain modules."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from coreslice import __version__
from coreslice.testbed import demo
from coreslice.cli import dsdt as dsdtcmd
from coreslice.host import profiles as hostcfg
from coreslice.cli import host as hostcmd
from coreslice.cli import slices as plancmd
from coreslice.cli import sriov as sriovcmd
from coreslice.cli import testbed as testbed_cli
from coreslice.errors import CoresliceError, UsageError
from coreslice.units import format_size, parse_memory

BOOT_HELP = """\
Boot a Linux kernel on parked CPUs and free RAM of this host, with no hypervisor.

The host must have been booted with few CPUs and little memory (e.g. 'maxcpus=1 mem=6G'), so that
the CPUs named by --cpus are present but offline and the --memory range is RAM above the host's
mem= limit.  coreslice writes the kernel, initrd, a zero page, ACPI tables (RSDP, XSDT, FADT,
MADT, MCFG, DSDT), page tables and a real-mode trampoline into physical memory through /dev/mem,
reads everything back, and wakes the first CPU with INIT-SIPI-SIPI.  Every check runs before the
first write: on bad input it exits 2 with one line saying what is wrong, and changes nothing.

With --ncpus N and/or --memory SIZE (no @BASE) coreslice chooses free CPUs and memory on one NUMA
node (see `coreslice plan`).  Each launch is recorded in the ledger (`coreslice list`) in the same
transaction that checks that no other slice of this host boot holds its CPUs, memory, low-memory
slot or console, before the first write; of two launches that race for the same resources, one
is refused.  Booting exactly the CPUs and memory of an existing slice relaunches it.
"""

BOOT_EPILOG = """\
examples:
  coreslice boot --kernel vmlinuz --initrd initrd.img --cpus 1-2 --memory 1G@0x40000000 --console io:0x2f8
  coreslice boot --kernel vmlinuz --initrd initrd.img --ncpus 2 --memory 1G --console io:0x2f8
  coreslice boot ... --dry-run out/          # write plan.json and every segment, touch nothing
exit status: 0 booted (or dry run written), 1 failed while acting on the machine, 2 bad input
"""


def _add_boot(sub) -> None:
    p = sub.add_parser("boot", help="boot a kernel as a slice on parked CPUs and free RAM",
                       description=BOOT_HELP, epilog=BOOT_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", required=True, type=Path, metavar="PATH", help="x86-64 bzImage (e.g. /boot/vmlinuz-*)")
    p.add_argument("--initrd", type=Path, metavar="PATH", help="initramfs for the slice")
    p.add_argument("--cmdline", default="", metavar="STR",
                   help="kernel parameters appended after coreslice's own (console, noapic, tsc, pci=off ...)")
    plancmd.add_placement_args(p)  # --cpus|--ncpus, --memory, --numa-node, --name, --ledger
    p.add_argument("--console", required=True, metavar="io:PORT|PCI-ADDR",
                   help="the slice's serial console: a legacy 16550 port (io:0x2f8) or a PCI UART (0000:00:03.0), "
                        "which is unbound from its host driver and counts as an assigned PCI function")
    p.add_argument("--device", dest="devices", action="append", default=[], metavar="PCI-ADDR",
                   help="a PCI function for the slice (repeatable): unbound from its host driver before the first "
                        "write; the slice's DSDT then lists the root complexes holding its functions, and the slice "
                        "gets pci=nobios,norom,nobar,realloc=off,lastbus=0x100 instead of pci=off")
    sriovcmd.add_vf_args(p)  # --nic-vf, --nvme-vf, --mac, --config
    p.add_argument("--guest-kernel", choices=("stock", "slice"), default="stock",
                   help="the slice's kernel: 'stock' (default) gets whole functions only, each on a root bus the "
                        "slice owns (SR-IOV VFs are refused); 'slice' is the prototype's kernel, which may drive VFs: "
                        "it gets pci=...,permit_probe_only=<functions> and pci-vf-as-pf.pf=<PFs> pci-vf-as-pf.vf=<index>")
    p.add_argument("--tsc-khz", type=int, metavar="KHZ",
                   help="TSC frequency passed to the slice (default: the host's calibration from its kernel log)")
    p.add_argument("--earlyprintk", action="store_true", help="also print early boot messages on the console")
    p.add_argument("--dry-run", type=Path, metavar="DIR",
                   help="do everything except touching the machine: write plan.json, dsdt.asl and one file per "
                        "segment (physical address in the name) into DIR")
    p.add_argument("--host-root", type=Path, default=Path("/"), metavar="DIR",
                   help="read the host from a captured tree of its /sys, /proc and /dev/kmsg instead of the live "
                        "host (only with --dry-run; for tests and planning on another machine; tests may set "
                        f"{plancmd.FAKE_MACHINE_ENV}=1 to launch onto in-memory fakes instead)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the plan and phase timings")
    p.set_defaults(func=_cmd_boot)


def _cmd_boot(args) -> int:
    from coreslice.host.snapshot import discover
    from coreslice.launch.session import boot, stderr_progress
    from coreslice.ledger import LedgerConflict
    from coreslice.request import BootSpec

    from coreslice.config import apply_slice_defaults
    apply_slice_defaults(args)  # --ncpus / --memory from the config's [slice] when not given
    size, base = parse_memory(args.memory)
    live = args.host_root.resolve() == Path("/")
    if not live and args.dry_run is None and not plancmd.fake_machine_requested(live):
        raise UsageError("--host-root describes another machine: it only goes with --dry-run")
    machine = plancmd.make_machine(live)
    host = discover(args.host_root)
    ledger = plancmd.open_ledger(args.ledger, host, readonly=args.dry_run is not None)
    progress = (lambda _m: None) if args.json else stderr_progress
    # SR-IOV VFs: every check first; then (unless a dry run) the host-side preparation, undone
    # below when the boot is refused before touching the machine.
    vfs = sriovcmd.boot_vfs(args, host, ledger, progress=progress)
    if vfs.prep is not None and vfs.prep.vfs:
        host = discover(args.host_root)  # the VFs exist now
    # Placed by coreslice (--ncpus, or --memory without @BASE): when a concurrent launch takes
    # the chosen resources between placement and reservation, place again.
    auto = args.ncpus is not None or base is None
    for attempt in range(1, 4):
        placed = plancmd.place_for(host, args, size, base, ledger, machine) if auto else None
        spec = BootSpec(kernel=args.kernel, initrd=args.initrd, cpus=placed.cpus if placed else args.cpus,
                        mem_size=size, mem_base=placed.mem_base if placed else base,
                        console=args.console, cmdline=args.cmdline, tsc_khz=args.tsc_khz,
                        earlyprintk=args.earlyprintk, name=args.name, devices=[*args.devices, *vfs.devices],
                        extra={"pci_extra": vfs.pci_extra} if vfs.pci_extra else {})
        if vfs.cmdline:
            spec.cmdline = f"{vfs.cmdline} {spec.cmdline}".strip()
        try:
            result = boot(spec, host=host, machine=machine, dry_run=args.dry_run, progress=progress, ledger=ledger)
            break
        except LedgerConflict as e:
            if not auto or attempt == 3:
                if vfs.prep is not None:
                    raise type(e)(f"{e}; {vfs.undo()}") from e
                raise
            progress("a concurrent launch took those resources; placing again")
        except UsageError as e:  # refused before the first write: undo the VF preparation
            if vfs.prep is not None:
                raise UsageError(f"{e}; {vfs.undo()}") from e
            raise
    if args.json:
        out = result.to_json()
        out["placement"] = placed.to_json() if placed else None
        print(json.dumps(out, indent=2))
    else:
        p = result.plan
        name = result.slice.name if result.slice else spec.name or f"slice-{p.cpus[0]}"
        what = f"dry run written to {result.dry_run_dir}" if result.dry_run_dir else f"slice '{name}' started"
        print(f"{what}: CPUs {','.join(map(str, p.cpus))} (APIC IDs {','.join(map(str, p.apic_ids))}), "
              f"{format_size(p.mem_size)}@0x{p.mem_base:x}, console 0x{p.console.port:x}, "
              f"{result.image.total_bytes >> 20} MiB in {sum(result.phases.values()):.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coreslice",
        description="Split one x86 machine into slices: dedicated cores, a physical memory range and "
                    "devices, each running its own Linux kernel directly on the hardware.")
    parser.add_argument("--version", action="version", version=f"coreslice {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_boot(sub)
    plancmd.register(sub)  # plan, list, stop
    host = sub.add_parser("host", help="this host: what it has (show), whether it is ready (check), its kernel command line (configure)",
                          description="Inspect and configure the host that launches slices.")
    hsub = host.add_subparsers(dest="host_command", required=True, metavar="COMMAND")
    hostcfg.register(hsub)  # configure, check
    hostcmd.register(hsub)  # show
    dsdtcmd.register(sub)
    sriovcmd.register(sub)
    testbed_cli.register(sub)
    demo.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CoresliceError as e:
        msg = str(e).replace("\n", " ")
        print(f"coreslice: error: {msg}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": msg, "exit_code": e.exit_code}))
        return e.exit_code
    except KeyboardInterrupt:
        print("coreslice: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
