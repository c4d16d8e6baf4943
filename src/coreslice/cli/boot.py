"""``coreslice boot``: flags -> one BootRequest -> the launch session."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from coreslice import config as configmod
from coreslice.cli import slices, sriov
from coreslice.cli.host import root_arg
from coreslice.errors import UsageError
from coreslice.launch.session import LaunchSession, stderr_progress
from coreslice.machine import FAKE_MACHINE_ENV, for_host as machine_for
from coreslice.request import BootRequest, boot_request
from coreslice.units import format_size

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


def register(sub) -> None:
    # allow_abbrev=False: a recorded request is replayed by `restart`; it must mean the same then.
    p = sub.add_parser("boot", help="boot a kernel as a slice on parked CPUs and free RAM",
                       description=BOOT_HELP, epilog=BOOT_EPILOG, allow_abbrev=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", type=Path, metavar="PATH", help="x86-64 bzImage (e.g. /boot/vmlinuz-*)")
    p.add_argument("--initrd", type=Path, metavar="PATH", help="initramfs for the slice")
    p.add_argument("--image", metavar="NAME|DIR",
                   help="boot what `coreslice image build` made: the kernel, initrd and root=LABEL=... of DIR's "
                        "image.json (a NAME is looked up under /var/lib/coreslice/images); the disk itself must be among the "
                        "slice's devices (--device or --nvme-vf)")
    p.add_argument("--cmdline", default="", metavar="STR",
                   help="kernel parameters appended after coreslice's own (console, noapic, tsc, pci=off ...)")
    slices.add_placement_args(p)  # --cpus|--ncpus, --memory, --numa-node, --name, --ledger
    p.add_argument("--console", required=True, metavar="io:PORT|PCI-ADDR|none",
                   help="the slice's serial console: a legacy 16550 port (io:0x2f8) or a PCI UART (0000:00:03.0), "
                        "which is unbound from its host driver and counts as an assigned PCI function; or 'none': "
                        "no UART, read the kernel log from the slice's memory with `coreslice console NAME`")
    p.add_argument("--device", dest="devices", action="append", default=[], metavar="PCI-ADDR",
                   help="a PCI function for the slice (repeatable): unbound from its host driver before the first "
                        "write; the slice's DSDT then lists the root complexes holding its functions, and the slice "
                        "gets pci=nobios,norom,nobar,realloc=off,lastbus=0x100 instead of pci=off")
    sriov.add_vf_args(p)  # --nic-vf, --nvme-vf, --mac, --config
    p.add_argument("--guest-kernel", choices=("stock", "slice"), default="stock",
                   help="the slice's kernel: 'stock' (default) gets whole functions only, each on a root bus the "
                        "slice owns (SR-IOV VFs are refused); 'slice' is the prototype's kernel, which may drive VFs: "
                        "it gets pci=...,permit_probe_only=<functions> and pci-vf-as-pf.pf=<PFs> pci-vf-as-pf.vf=<index>")
    p.add_argument("--tsc-khz", type=int, metavar="KHZ",
                   help="TSC frequency passed to the slice (default: the host's calibration from its kernel log)")
    p.add_argument("--earlyprintk", action="store_true", help="also print early boot messages on the console")
    p.add_argument("--devices-polled", action="store_true",
                   help="the slice's drivers poll its devices: boot even where their interrupts cannot reach it "
                        "(a host with interrupt remapping on blocks their MSIs; CPUs with APIC IDs above 255 "
                        "cannot be named by an MSI); without it such slices are refused")
    p.add_argument("--on-crash", choices=("none", "restart"), default="none",
                   help="what `coreslice watch` does when the slice panics, halts, powers off or reboots: "
                        "'restart' boots it again with this request (default: none, it stays stopped in place)")
    p.add_argument("--wake-timeout", type=_seconds, default=2.0, metavar="S",
                   help="seconds to wait for the woken CPU to report, from the trampoline, that it reached the "
                        "kernel entry (default 2; a CPU on hardware answers within microseconds); boot fails "
                        "with exit 1 when it does not")
    p.add_argument("--dry-run", type=Path, metavar="DIR",
                   help="do everything except touching the machine: write plan.json, dsdt.asl and one file per "
                        "segment (physical address in the name) into DIR")
    p.add_argument("--host-root", type=root_arg, default=Path("/"), metavar="DIR",
                   help="read the host from a captured tree of its /sys, /proc and /dev/kmsg instead of the live "
                        "host (only with --dry-run; for tests and planning on another machine; tests may set "
                        f"{FAKE_MACHINE_ENV}=1 to launch onto in-memory fakes instead)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the plan and phase timings")
    p.set_defaults(func=cmd_boot, boot_parser=p)


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0 < v <= 600:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds between 0 and 600; give e.g. 2")
    return v


# Not kept for `restart`: placement is replaced by the resources the slice got (the ledger row),
# and the rest says how this one run prints or where it reads, not what the slice is.
NOT_RECORDED = {"help", "cpus", "ncpus", "memory", "numa_node", "name", "ledger", "json", "dry_run", "host_root"}


def recorded_argv(parser: argparse.ArgumentParser, args) -> tuple[str, ...]:
    """The boot arguments that differ from their defaults, as `coreslice restart` replays them
    (paths made absolute: restart may run from another directory)."""
    out: list[str] = []
    for a in parser._actions:
        if not a.option_strings or a.dest in NOT_RECORDED:
            continue
        value = getattr(args, a.dest, None)
        if value is None or value is False or value == a.default:
            continue
        flag = max(a.option_strings, key=len)
        if a.nargs == 0:
            out.append(flag)
            continue
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, Path) or (a.dest == "image" and Path(v).exists()):
                v = Path(v).absolute()
            out.append(f"{flag}={v}")  # one word: a value starting with '-' replays too
    return tuple(out)


def request_from(args) -> BootRequest:
    """The namespace and the configuration file, resolved once into the typed request."""
    config = configmod.load(args.config)
    kernel, initrd, cmdline = image_boot_files(args.image, args.kernel, args.initrd, args.cmdline)
    return boot_request(
        kernel=kernel, initrd=initrd, console=args.console, memory=args.memory, cpus=args.cpus,
        ncpus=args.ncpus, numa_node=args.numa_node, name=args.name, cmdline=cmdline,
        devices=args.devices, nic_vfs=args.nic_vfs, nvme_vfs=args.nvme_vfs, mac=args.mac,
        guest_kernel=args.guest_kernel, tsc_khz=args.tsc_khz, earlyprintk=args.earlyprintk,
        devices_polled=args.devices_polled,
        dry_run=args.dry_run, host_root=args.host_root, ledger=args.ledger, config=config,
        on_crash=args.on_crash, wake_timeout=args.wake_timeout,
        record_argv=recorded_argv(args.boot_parser, args) if hasattr(args, "boot_parser") else None)


def image_boot_files(image: str | None, kernel: Path | None, initrd: Path | None,
                     cmdline: str) -> tuple[Path, Path | None, str]:
    """--image fills --kernel, --initrd and root=LABEL=... (a root= in --cmdline wins)."""
    if image is None:
        if kernel is None:
            raise UsageError("give the slice's kernel with --kernel PATH, or --image NAME|DIR from coreslice image build")
        return kernel, initrd, cmdline
    if kernel is not None or initrd is not None:
        raise UsageError("--image brings its own kernel and initrd; drop --kernel/--initrd, or drop --image")
    from coreslice.image.build import load_manifest  # only here: keeps boot's imports small
    m = load_manifest(image)
    ours = " ".join(w for w in m["cmdline"].split() if not (w.startswith("root=") and "root=" in cmdline))
    return Path(m["vmlinuz"]), Path(m["initrd"]), " ".join(x for x in (ours, cmdline) if x)


def cmd_boot(args) -> int:
    req = request_from(args)
    # None for a captured tree (no effects: dry runs only), the fake one when tests ask for it.
    machine = machine_for(req.live, req.host_root)
    progress = (lambda _m: None) if args.json else stderr_progress
    result = LaunchSession(req, machine, progress).run()
    for w in result.plan.warnings:  # --json carries them in plan.warnings
        if not args.json:
            print(f"coreslice: warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    p = result.plan
    name = result.slice.name if result.slice else req.name or f"slice-{p.cpus[0]}"
    what = f"dry run written to {result.dry_run_dir}" if result.dry_run_dir else f"slice '{name}' started"
    print(f"{what}: CPUs {','.join(map(str, p.cpus))} (APIC IDs {','.join(map(str, p.apic_ids))}), "
          f"{format_size(p.mem_size)}@0x{p.mem_base:x}, "
          f"console {'none' if p.console.port is None else f'0x{p.console.port:x}'}, "
          f"{result.image.total_bytes >> 20} MiB in {result.phases.get('total', 0.0):.2f} s"
          + (f"; in its kernel {result.wake['kernel_s'] * 1000:.1f} ms after the SIPI" if result.wake else ""))
    return 0
