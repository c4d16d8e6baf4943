"""``coreslice nvme ns list|create|attach|detach|delete``: NVMe namespaces through nvme-cli."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from coreslice.errors import UsageError
from coreslice.nvme import ops
from coreslice.units import format_size, parse_size

# Tests point these at a fake runner and a fake sysfs tree.
make_cli = ops.NvmeCli
SYSFS_ROOT: Path = Path("/")

CTRL_HELP = "the controller: /dev/nvme0, nvme0 or its PCI address (0000:8d:00.0)"

NS_HELP = """\
NVMe namespaces of one controller, through nvme-cli (apt-get install nvme-cli).  A slice gets a
namespace of its own: create it, attach it to this host to write an image (--host waits for
/dev/nvmeXnY), detach it, then attach it to the SR-IOV VF the slice is given (--vf INDEX).
Every check runs before the first change (exit 2, nothing changed); a failure while acting
exits 1.
"""

LIST_HELP = """\
List the namespaces allocated in the controller's subsystem (nvme list-ns --all), with their
size and LBA size (nvme id-ns --force) and the controllers each is attached to (nvme list-ctrl).
"""

CREATE_HELP = """\
Create a namespace of SIZE bytes with LBA_SIZE-byte blocks (nvme create-ns); it is attached to
nothing.  Refused when the controller has no Namespace Management command (QEMU's emulated
controller has only Namespace Attachment), when the unallocated capacity (UNVMCAP) is smaller
than SIZE, or when SIZE is not a multiple of LBA_SIZE.  Prints the new namespace's NSID.
"""

ATTACH_HELP = """\
Attach a namespace to exactly one target: --host (this host's controller; rescans and waits up
to --wait seconds for the block device /dev/nvmeXnY), --vf INDEX (the secondary controller of
SR-IOV VF INDEX, counted from 0, which must be enabled and online: see coreslice sriov prepare)
or --controller CNTLID.  A namespace attached anywhere already is refused: detach it first.
"""

DETACH_HELP = """\
Detach a namespace from this host's controller (default), from --controller CNTLID, or from
every controller it is attached to (--all).  Refused while it is mounted on this host.
"""

DELETE_HELP = "Delete a namespace (nvme delete-ns); refused while any controller is attached to it."


def _int(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"'{text}' is negative")
    return v


def _nsid(text: str) -> int:
    v = _int(text)
    if not 1 <= v < ops.NSID_ALL:
        raise argparse.ArgumentTypeError(f"namespace ID {text} is out of range (1 to 0xfffffffe)")
    return v


def register(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    nv = sub.add_parser("nvme", help="NVMe namespaces for slices (nvme-cli)",
                        description="NVMe controllers and their namespaces.")
    nsub = nv.add_subparsers(dest="nvme_command", required=True, metavar="COMMAND")
    ns = nsub.add_parser("ns", help="list, create, attach, detach, delete namespaces", description=NS_HELP,
                         formatter_class=fmt)
    s = ns.add_subparsers(dest="ns_command", required=True, metavar="COMMAND")

    def cmd(name, help_, desc, func, example):
        p = s.add_parser(name, help=help_, description=desc, formatter_class=fmt, epilog=f"example: {example}")
        p.add_argument("ctrl", metavar="CTRL", help=CTRL_HELP)
        p.set_defaults(func=func)
        return p

    def json_arg(p):
        p.add_argument("--json", action="store_true", help="print one JSON object")

    p = cmd("list", "namespaces, sizes and attachments", LIST_HELP, cmd_list, "coreslice nvme ns list nvme0 --json")
    json_arg(p)
    p = cmd("create", "create a namespace", CREATE_HELP, cmd_create,
            "coreslice nvme ns create /dev/nvme0 --size 64G --lba-size 4096")
    p.add_argument("--size", required=True, metavar="SIZE", help="bytes, or with K/M/G/T (powers of 1024), e.g. 64G")
    p.add_argument("--lba-size", type=int, choices=ops.LBA_SIZES, default=4096, metavar="512|4096",
                   help="logical block size in bytes (default 4096)")
    json_arg(p)
    p = cmd("attach", "attach a namespace to this host or a VF", ATTACH_HELP, cmd_attach,
            "coreslice nvme ns attach nvme0 3 --vf 0")
    p.add_argument("nsid", metavar="NSID", type=_nsid, help="the namespace ID (see ns list)")
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--host", action="store_true", help="this host's controller; waits for /dev/nvmeXnY")
    t.add_argument("--vf", type=_int, metavar="INDEX", help="the secondary controller of SR-IOV VF INDEX (0-based)")
    t.add_argument("--controller", type=_int, metavar="CNTLID", help="a controller ID of the subsystem (0x41 or 65)")
    p.add_argument("--wait", type=float, default=10.0, metavar="S",
                   help="with --host: seconds to wait for the block device (default 10)")
    json_arg(p)
    p = cmd("detach", "detach a namespace", DETACH_HELP, cmd_detach, "coreslice nvme ns detach nvme0 3 --all")
    p.add_argument("nsid", metavar="NSID", type=_nsid, help="the namespace ID")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--controller", type=_int, metavar="CNTLID", help="detach from this controller only")
    t.add_argument("--all", action="store_true", help="detach from every controller it is attached to")
    json_arg(p)
    p = cmd("delete", "delete a namespace", DELETE_HELP, cmd_delete, "coreslice nvme ns delete nvme0 3")
    p.add_argument("nsid", metavar="NSID", type=_nsid, help="the namespace ID")
    json_arg(p)


def _open(args) -> ops.Controller:
    return ops.open_controller(args.ctrl, cli=make_cli(), root=SYSFS_ROOT)


def _print(args, obj: dict, text: str) -> int:
    print(json.dumps({"ok": True, **obj}, indent=2) if args.json else text)
    return 0


def cmd_list(args) -> int:
    ctrl = _open(args)
    info = ops.controller_info(ctrl)
    nss = ops.list_namespaces(ctrl)
    lines = [f"{ctrl.name} ({info.pci or '-'}, {info.model}): cntlid 0x{info.cntlid:x}, "
             f"namespace management {'yes' if info.ns_management else 'no'}"
             + (" (attach only)" if info.ns_create is False else "")
             + (f", {format_size(info.unvmcap)} of {format_size(info.tnvmcap)} unallocated" if info.tnvmcap else "")]
    for n in nss:
        where = ", ".join(f"0x{c:x} ({ops.describe_controller(ctrl, c)})" for c in n.controllers) or "not attached"
        lines.append(f"  nsid {n.nsid}: {format_size(n.size_bytes)} in {n.lba_size}-byte blocks; {where}"
                     + (f"; {n.block_device}" if n.block_device else ""))
    return _print(args, {"controller": info.to_json(), "namespaces": [n.to_json() for n in nss]}, "\n".join(lines))


def cmd_create(args) -> int:
    size = parse_size(args.size, "--size")
    ctrl = _open(args)
    nsid = ops.create(ctrl, size, args.lba_size)
    return _print(args, {"controller": ctrl.name, "nsid": nsid, "size_bytes": size, "lba_size": args.lba_size},
                  f"created namespace {nsid} on {ctrl.name}: {format_size(size)} in {args.lba_size}-byte blocks")


def cmd_attach(args) -> int:
    if not 0 < args.wait <= 3600:
        raise UsageError(f"--wait {args.wait:g} is out of range; give seconds between 0 and 3600")
    ctrl = _open(args)
    out = {"controller": ctrl.name, "nsid": args.nsid}
    if args.host:
        dev = ops.attach_to_host(ctrl, args.nsid, deadline=args.wait)
        cntlid = ops.controller_info(ctrl).cntlid
        out.update(target="host", cntlid=cntlid, block_device=dev)
        text = f"namespace {args.nsid} attached to {ctrl.name} (controller 0x{cntlid:x}): {dev}"
    elif args.vf is not None:
        cntlid = ops.attach_to_vf(ctrl, args.nsid, args.vf)
        out.update(target="vf", vf=args.vf, cntlid=cntlid)
        text = f"namespace {args.nsid} attached to VF {args.vf} (secondary controller 0x{cntlid:x})"
    else:
        ops.attach(ctrl, args.nsid, [args.controller])
        out.update(target="controller", cntlid=args.controller)
        text = f"namespace {args.nsid} attached to controller 0x{args.controller:x}"
    return _print(args, out, text)


def cmd_detach(args) -> int:
    ctrl = _open(args)
    done = ops.detach(ctrl, args.nsid, None if args.controller is None else [args.controller],
                      all_attached=args.all)
    return _print(args, {"controller": ctrl.name, "nsid": args.nsid, "detached_from": done},
                  f"namespace {args.nsid} detached from controller {', '.join(f'0x{c:x}' for c in done)}")


def cmd_delete(args) -> int:
    ctrl = _open(args)
    ops.delete(ctrl, args.nsid)
    return _print(args, {"controller": ctrl.name, "nsid": args.nsid, "deleted": True},
                  f"namespace {args.nsid} deleted from {ctrl.name}")
