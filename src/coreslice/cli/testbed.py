"""``coreslice testbed`` command line.  ``register(subparsers)`` adds it to the main CLI;
``python -m coreslice.testbed.cli run ...`` works on its own."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from coreslice.testbed.tools import set_quiet

RUN_DESCRIPTION = """\
Boot the emulated machine (QEMU q35 under TCG) with a stock Debian 6.12 host kernel on one CPU
(maxcpus=1 mem=HOST-MEM), the build machine's root shared read-only so this working tree's
coreslice runs inside it (the tree, its venv, the kernels and the run directory are shared on
their own as well, at the same paths, so any folder works, /tmp included), and run `coreslice boot ARGS --json` there for each --slice, in order.
--kernel, --initrd (the testbed's slice kernel and report initramfs) and a free --console
(the PCI UARTs 0000:21:00.0, 0000:41:00.0, 0000:61:00.0, each alone on a pxb-pcie root bus
0000:20/40/60 behind a root port; with --isa-consoles io:0x2f8, io:0x3e8, io:0x2e8; a PCI UART
at 0000:00:10.0 on the host's bus 0 is also present) are added when ARGS do not give them.
The testbed waits until each launched slice writes its CORESLICE-REPORT line on its console
(or --slice-timeout passes), then runs each --host-cmd in the host's shell and powers
the host off.  Artefacts (console logs, job script, outputs, result.json) stay in the run
directory.  Exit status 0 when every slice whose `coreslice boot` succeeded reached user space
(and the host job completed), else 1.
"""


def _positive_float(text: str) -> float:
    v = float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text}: give a positive number of seconds")
    return v


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slice", dest="slices", action="append", default=[], metavar="BOOT ARGS",
                   help="arguments for one `coreslice boot` run inside the host (one string, "
                        "shell-split); repeat for more slices, booted in order")
    p.add_argument("--host-cmd", dest="host_cmds", action="append", default=[], metavar="SHELL",
                   help="a shell command run in the host after the slices reported; output and "
                        "exit code are recorded; repeatable")
    p.add_argument("--smp", type=int, default=4, metavar="N",
                   help="CPUs of the emulated machine; the host keeps CPU 0 (default: 4)")
    p.add_argument("--memory", default="6G", metavar="SIZE",
                   help="RAM of the emulated machine, QEMU -m syntax (default: 6G)")
    p.add_argument("--host-mem", default="1G", metavar="SIZE",
                   help="RAM the host kernel uses (mem=); the rest is free for slices (default: 1G)")
    p.add_argument("--cpu-model", default="max", metavar="MODEL",
                   help="QEMU -cpu model, e.g. max or max,-x2apic (default: max)")
    p.add_argument("--x2apic", action="store_true",
                   help="run the host in x2APIC mode (adds an interrupt-remapping intel-iommu; "
                        "host gets intel_iommu=off); default: xAPIC, no IOMMU")
    p.add_argument("--iommu", action="store_true",
                   help="give the host a DMA-remapping IOMMU (intel-iommu,intremap=off; host gets "
                        "intel_iommu=on intremap=off and loads VFIO); not with --x2apic, which needs "
                        "interrupt remapping (default: no IOMMU)")
    p.add_argument("--dma-probe", action="store_true",
                   help="give each slice a QEMU edu DMA engine on its own root bus (root port N:03.0; "
                        "needs the pxb consoles) and make its init DMA from its own RAM and from host "
                        "address 0x0; each slice's JSON gets \"dma\": own_ok, host_blocked, fault_logged "
                        "(a DMAR fault the host logged for the edu)")
    p.add_argument("--kernel-version", default=None, metavar="VER",
                   help="Debian kernel to use, as linux-image-amd64 package version or as release "
                        "(6.12.95+deb12-amd64); default: newest 6.12 in bookworm-backports")
    p.add_argument("--timeout", type=_positive_float, default=240.0, metavar="SECONDS",
                   help="limit for the whole run, QEMU start to power-off (default: 240)")
    p.add_argument("--slice-timeout", type=_positive_float, default=120.0, metavar="SECONDS",
                   help="how long a launched slice may take to report from user space, counted "
                        "from its `coreslice boot` start (default: 120)")
    p.add_argument("--wait-each", action="store_true",
                   help="boot each slice only after the previous one reported (or timed out); "
                        "lets slices share a console, e.g. to relaunch on the same CPUs "
                        "(default: boot all, then wait)")
    p.add_argument("--isa-consoles", dest="pci_consoles", action="store_false",
                   help="give slices without --console a legacy ISA UART (io:0x2f8, io:0x3e8, "
                        "io:0x2e8; then the slice runs with pci=off) instead of the default, a PCI "
                        "UART on a PCI root bus of its own (0000:21:00.0, 0000:41:00.0, "
                        "0000:61:00.0), as on the prototype's hardware; the result JSON lists "
                        "every UART under host.serial_ports")
    p.add_argument("--numa", type=int, default=0, metavar="N",
                   help="split the machine into N NUMA nodes (contiguous CPUs, equal RAM in address "
                        "order), which gives it an ACPI SRAT (default: 0, no NUMA, no SRAT)")
    p.add_argument("--sriov", action="store_true",
                   help="give the host SR-IOV physical functions: an igb NIC (7 VFs) and an nvme "
                        "controller in an NVMe subsystem with 4 secondary controllers (flexible queue "
                        "and interrupt resources), each behind a root port on bus 0; the host loads igb "
                        "and nvme (default: off)")
    p.add_argument("--storage", action="store_true",
                   help="give each slice a whole NVMe controller on its own root bus (next to its "
                        "UART), backed by an ext4 image in the run dir holding /hello.txt; the "
                        "slice mounts it, reads the file and writes /result.txt")
    p.add_argument("--network", action="store_true",
                   help="give each slice a whole e1000e NIC on its own root bus, linked to a host "
                        "NIC (link K: host 10.99.K.1/24, slice 10.99.K.2); the slice pings the host. "
                        "With --storage/--network the host also gets its own NVMe disk and NIC, "
                        "checked after the slices reported")
    p.add_argument("--guest-os", metavar="debian|DIR",
                   help="each slice boots a real OS from its own NVMe disk (implies --storage; needs --network): "
                        "'debian' builds one per slice with coreslice image build (systemd, cloud-init, "
                        "openssh-server, the testbed kernel; the Debian root is cached), DIR boots an image "
                        "out-dir through a copy-on-write overlay.  The host logs in over SSH and the slice's JSON "
                        "gets \"os\": hostname, ssh_ok, cloud_init, root_source, seconds_to_ssh")
    p.add_argument("--guest-cloud-config", type=Path, metavar="FILE",
                   help="cloud-init user-data for --guest-os debian (default: user 'slicer' with the run's key, "
                        "hostname slice<K>); the host logs in as its first user")
    p.add_argument("--guest-ssh-key", type=Path, metavar="FILE",
                   help="the private key the host logs in with (its .pub must be beside it; default: a new "
                        "ed25519 pair in the run dir)")
    p.add_argument("--keep-guest-disks", action="store_true",
                   help="keep the guest disks in the run dir (default: removed after the run; they are large)")
    p.add_argument("--audit", action="store_true",
                   help="record every device register access (MMIO, I/O port) of each slice's CPUs, from "
                        "the first boot to --audit-steady seconds after the last report (QEMU's "
                        "memory_region_ops trace); each slice's JSON gets \"audit\": its own and its "
                        "foreign accesses per region and address")
    p.add_argument("--audit-steady", type=_positive_float, default=10.0, metavar="SECONDS",
                   help="with --audit: how long the slices keep running, traced, after they all reported "
                        "(default: 10)")
    p.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                   help="run directory (new or empty; anywhere but /proc, /sys, /dev); default: "
                        "$CORESLICE_CACHE/runs/<time>-<pid> (cache: ~/.cache/coreslice)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with host facts, slices and host commands")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so QEMU teardown (``finally``) runs."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def cmd_run(args: argparse.Namespace) -> int:
    from coreslice.testbed.run import RunOptions, main_run

    set_quiet(args.quiet)
    _exit_on_sigterm()
    opts = RunOptions(
        slices=args.slices, host_cmds=args.host_cmds, smp=args.smp, memory=args.memory,
        host_mem=args.host_mem, cpu_model=args.cpu_model, x2apic=args.x2apic,
        kernel_version=args.kernel_version, timeout=args.timeout,
        slice_timeout=args.slice_timeout, workdir=args.workdir, wait_each=args.wait_each,
        pci_consoles=args.pci_consoles,
        numa=args.numa,
        sriov=args.sriov,
        storage=args.storage, network=args.network,
        guest_os=args.guest_os, guest_cloud_config=args.guest_cloud_config,
        guest_ssh_key=args.guest_ssh_key, keep_guest_disks=args.keep_guest_disks,
        audit=args.audit, audit_steady=args.audit_steady,
        iommu=args.iommu, dma_probe=args.dma_probe,
    )
    return main_run(opts, args.json)


def cmd_whole(args: argparse.Namespace) -> int:
    from coreslice.errors import CoresliceError
    from coreslice.testbed import initramfs, kernels
    from coreslice.testbed.paths import cache_dir
    from coreslice.testbed.qemu import boot_whole_machine

    set_quiet(args.quiet)
    _exit_on_sigterm()
    try:
        k = kernels.ensure_kernel(args.kernel_version)
        initrd = initramfs.build_slice_initramfs(k)
        import os
        import time

        workdir = args.workdir or cache_dir() / "runs" / f"whole-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        r = boot_whole_machine(k.vmlinuz, initrd, workdir, smp=args.smp, memory=args.memory,
                               cpu_model=args.cpu_model, timeout=args.timeout)
    except CoresliceError as exc:
        print(f"coreslice testbed: {exc}", file=sys.stderr)
        return exc.exit_code
    out = {"seconds": r.seconds, "report": r.report, "console_log": str(r.console_log),
           "qemu_command": r.command}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"whole machine: user space after {r.seconds} s; report {r.report}; log {r.console_log}")
    return 0 if r.report else 1


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``testbed`` (with ``run`` and ``whole``) to a main parser's subparsers."""
    tb = subparsers.add_parser(
        "testbed", help="the emulated machine (QEMU) for demos and end-to-end tests",
        description="The emulated machine: QEMU q35 under TCG booting the stock Debian kernel.",
    )
    sub = tb.add_subparsers(dest="testbed_command", metavar="COMMAND", required=True)
    run = sub.add_parser("run", help="boot the emulated host and slices inside it",
                         description=RUN_DESCRIPTION,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(run)
    run.set_defaults(func=cmd_run)
    whole = sub.add_parser(
        "whole", help="boot the slice kernel + initramfs as a whole machine and time it",
        description="Boot the testbed's slice kernel and report initramfs as a whole QEMU "
                    "machine (console ttyS0) and time QEMU start to the CORESLICE-REPORT line: "
                    "the baseline a slice boot is compared with.")
    whole.add_argument("--smp", type=int, default=2, metavar="N", help="CPUs (default: 2)")
    whole.add_argument("--memory", default="1G", metavar="SIZE", help="RAM (default: 1G)")
    whole.add_argument("--cpu-model", default="max", metavar="MODEL", help="QEMU -cpu (default: max)")
    whole.add_argument("--kernel-version", default=None, metavar="VER")
    whole.add_argument("--timeout", type=_positive_float, default=180.0, metavar="SECONDS")
    whole.add_argument("--workdir", type=Path, default=None, metavar="DIR")
    whole.add_argument("--json", action="store_true")
    whole.add_argument("--quiet", action="store_true")
    whole.set_defaults(func=cmd_whole)
    return tb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coreslice.testbed.cli")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    tb = register(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    # Standalone: allow both `... testbed run ...` and `... run ...`.
    if argv and argv[0] != "testbed" and argv[0] not in ("-h", "--help"):
        argv = ["testbed", *argv]
    del tb
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
