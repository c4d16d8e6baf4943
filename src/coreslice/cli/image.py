"""``coreslice image``: build slice disk images (and install them onto a VF's namespace)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from coreslice.errors import UsageError
from coreslice.units import parse_size

BUILD_HELP = """\
Build a bootable slice disk: a GPT with one Linux root partition holding ext4 (label
cloudimg-rootfs by default), filled from a root tarball or from Debian packages, with the
kernel's modules inside, /etc/fstab, and a cloud-init NoCloud seed (user-data from
--cloud-config, meta-data with instance-id and hostname, network config for the slice's NIC).
The kernel and initrd are copied to --out-dir with image.json, for `coreslice boot --image DIR`.

A file target is built without root, loop devices or mounts (sfdisk on the file, then
mkfs.ext4 -d straight from the tarball at the partition's offset), so any user can build one.
Every input is checked before the first write; a failure removes the file (or wipes the
device's partition table): a disk is never left looking like an image when it is not one.
"""

BUILD_EPILOG = """\
examples:
  coreslice image build --debian bookworm --kernel-deb linux-image-6.12.*.deb \\
      --target slice1.img --out-dir slice1 --cloud-config user.yaml --ssh-key ~/.ssh/id_ed25519.pub \\
      --network 10.99.1.2/24,10.99.1.1
  coreslice image build --rootfs root.tar.xz --sha256 HEX --target /dev/nvme0n2 --out-dir /var/lib/coreslice/images/s1
exit status: 0 built, 1 failed while writing (the target was discarded), 2 bad input (nothing written)
"""


def _size(text: str) -> int:
    return parse_size(text, "--size")


def register(sub) -> None:
    p = sub.add_parser("image", help="build slice disk images (root file system, kernel, cloud-init)",
                       description="Slice disk images: build one onto a file, a block device or a namespace.")
    isub = p.add_subparsers(dest="image_command", metavar="COMMAND", required=True)
    b = isub.add_parser("build", help="build a bootable slice disk", description=BUILD_HELP, epilog=BUILD_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--target", required=True, type=Path, metavar="FILE|DEV",
                   help="a new image file, or a block device / NVMe namespace (not mounted, not in use)")
    b.add_argument("--size", type=_size, metavar="SIZE",
                   help="size of a file target (default: what the tree needs plus half again, at least 512M more)")
    add_image_args(b)
    b.set_defaults(func=cmd_build)
    i = isub.add_parser("install", help="create a namespace, build an image on it and give it to an NVMe VF",
                        description=INSTALL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="example:\n  coreslice image install --nvme-vf 0000:8d:00.0:1 --size 16G --debian bookworm "
                               "\\\n      --out-dir /var/lib/coreslice/images/s1 --cloud-config user.yaml\n"
                               "exit status: 0 installed, 1 failed while acting (undone), 2 bad input (nothing changed)")
    i.add_argument("--nvme-vf", required=True, metavar="PF:INDEX",
                   help="the PF's controller (PCI address, nvmeN) and the VF index (from 0) whose disk this is")
    ns = i.add_mutually_exclusive_group(required=True)
    ns.add_argument("--size", type=_size, metavar="SIZE", help="create a namespace of this size")
    ns.add_argument("--nsid", type=int, metavar="N", help="use this allocated namespace (attached to no controller)")
    i.add_argument("--lba-size", type=int, choices=(512, 4096), default=4096, help="LBA size of a new namespace")
    i.add_argument("--wait", type=float, default=10.0, metavar="S", help="how long to wait for the block device")
    i.add_argument("--ledger", type=Path, metavar="PATH", help="the ledger file (default: coreslice's)")
    add_image_args(i)
    i.set_defaults(func=cmd_install)


def add_image_args(p) -> None:
    """What goes on the disk: shared by build and install."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--rootfs", metavar="FILE|URL",
                     help="a root file system tarball (.tar, .tar.gz, .tar.xz; Debian or Ubuntu cloud roots); a URL "
                          "is downloaded with resume and needs --sha256")
    src.add_argument("--debian", metavar="SUITE",
                     help="build the root from Debian packages with mmdebstrap (cached by its inputs), from this "
                          "machine's own apt sources")
    p.add_argument("--sha256", metavar="HEX", help="expected sha256 of --rootfs, checked before anything is written")
    p.add_argument("--packages", action="append", default=[], metavar="LIST",
                   help="more packages for --debian (comma-separated, repeatable); systemd, udev, cloud-init and "
                        "openssh-server are always in")
    p.add_argument("--eval-tools", action="store_true",
                   help="add the workloads of coreslice eval run (--debian only): " + " ".join(_eval_packages()))
    p.add_argument("--kernel-deb", dest="kernel_debs", action="append", default=[], type=Path, metavar="DEB",
                   help="the slice kernel's linux-image .deb, installed inside the image (modules match) instead "
                        "of the suite's linux-image-amd64 (repeatable; --debian only)")
    p.add_argument("--label", default="cloudimg-rootfs", help="ext4 label, booted as root=LABEL=... (default: %(default)s)")
    p.add_argument("--out-dir", required=True, type=Path, metavar="DIR",
                   help="where vmlinuz, initrd.img and image.json go (coreslice boot --image DIR); its name is the "
                        "default hostname")
    p.add_argument("--cloud-config", type=Path, metavar="FILE", help="cloud-init user-data (#cloud-config YAML)")
    p.add_argument("--ssh-key", dest="ssh_keys", action="append", default=[], type=Path, metavar="FILE",
                   help="an OpenSSH public key for the image's default user (repeatable)")
    p.add_argument("--hostname", help="the slice's hostname (default: the cloud-config's, else the out-dir's name)")
    p.add_argument("--instance-id", help="cloud-init instance-id (default: derived from the seed, so a new seed "
                                         "runs cloud-init again)")
    p.add_argument("--network", metavar="dhcp|ADDR/LEN[,GW[,DNS]]",
                   help="network config for the slice's NIC: DHCP or a static address")
    p.add_argument("--nic-mac", metavar="MAC", help="match the NIC by MAC (default: the first en* interface)")
    p.add_argument("--force", action="store_true", help="overwrite an existing target file or out-dir image")
    p.add_argument("--json", action="store_true", help="print one JSON object: sizes, partition, label, kernel, times")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


INSTALL_HELP = """\
The prototype's mkns.sh + mkimage.sh in one step, for a slice whose disk is an NVMe VF: create a
namespace of --size (or take the unattached namespace --nsid N), attach it to this host's
controller and wait for its block device, build the image onto it (as image build does), detach
it from the host and attach it to the VF's secondary controller; the ledger records which
namespace belongs to which VF.  Everything is checked first (the VF enabled and its secondary
controller online, namespace management and free capacity, the image's inputs); a failure
later undoes what was done, the namespace deleted again if this command created it.
"""


def _progress(quiet: bool):
    t0 = time.monotonic()

    def say(msg: str) -> None:
        if not quiet:
            print(f"[image {time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)
    return say


def cmd_build(args) -> int:
    from coreslice.image.build import BuildRequest, build

    req = BuildRequest(target=args.target, out_dir=args.out_dir, size=args.size, rootfs=args.rootfs,
                       sha256=args.sha256, debian=args.debian, packages=_packages(args),
                       kernel_debs=tuple(args.kernel_debs), label=args.label, cloud_config=args.cloud_config,
                       ssh_keys=tuple(args.ssh_keys), hostname=args.hostname, instance_id=args.instance_id,
                       network=args.network, nic_mac=args.nic_mac, force=args.force)
    result = build(req, _progress(args.quiet))
    if args.json:
        print(json.dumps({"ok": True, "image": result}, indent=2))
    else:
        print(f"image {result['target']['path']}: {result['image_bytes'] >> 20} MiB, root partition "
              f"{result['partition']['partition_bytes'] >> 20} MiB labelled {result['label']}, kernel "
              f"{result['kernel_release']}, in {result['times']['total']:.1f} s; boot it with "
              f"coreslice boot --image {args.out_dir} ...")
    return 0


def cmd_install(args) -> int:
    from coreslice.image.build import BuildRequest
    from coreslice.image.install import InstallRequest, install, parse_vf

    pf, index = parse_vf(args.nvme_vf)
    b = BuildRequest(target=Path("/dev/null"), out_dir=args.out_dir, rootfs=args.rootfs, sha256=args.sha256,
                     debian=args.debian, packages=_packages(args), kernel_debs=tuple(args.kernel_debs),
                     label=args.label, cloud_config=args.cloud_config, ssh_keys=tuple(args.ssh_keys),
                     hostname=args.hostname, instance_id=args.instance_id, network=args.network,
                     nic_mac=args.nic_mac, force=args.force)
    result = install(InstallRequest(pf=pf, vf_index=index, build=b, size=args.size, nsid=args.nsid,
                                    lba_size=args.lba_size, ledger=args.ledger, wait=args.wait),
                     _progress(args.quiet))
    if args.json:
        print(json.dumps({"ok": True, "install": result}, indent=2))
    else:
        print(f"namespace {result['nsid']} of {result['controller']} holds the image and is attached to VF "
              f"{result['vf_index']} (secondary controller 0x{result['secondary_controller']:x}); boot with "
              f"coreslice boot --image {args.out_dir} --nvme-vf {args.nvme_vf} ...")
    return 0


def _eval_packages() -> tuple[str, ...]:
    from coreslice.evaluation.workloads import EVAL_PACKAGES
    return EVAL_PACKAGES


def _packages(args) -> tuple[str, ...]:
    from coreslice.image.rootfs import check_packages
    items = list(args.packages)
    if args.eval_tools:
        if not args.debian:
            raise UsageError("--eval-tools installs Debian packages into the root it builds: give --debian SUITE "
                             f"(or install {' '.join(_eval_packages())} into your --rootfs yourself)")
        items.append(",".join(_eval_packages()))
    return check_packages(items)
