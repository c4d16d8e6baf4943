"""``coreslice image``: build slice disk images (and install them onto a VF's namespace)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

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
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--rootfs", metavar="FILE|URL",
                     help="a root file system tarball (.tar, .tar.gz, .tar.xz; Debian or Ubuntu cloud roots); a URL "
                          "is downloaded with resume and needs --sha256")
    src.add_argument("--debian", metavar="SUITE",
                     help="build the root from Debian packages with mmdebstrap (cached by its inputs), from this "
                          "machine's own apt sources")
    b.add_argument("--sha256", metavar="HEX", help="expected sha256 of --rootfs, checked before anything is written")
    b.add_argument("--packages", action="append", default=[], metavar="LIST",
                   help="more packages for --debian (comma-separated, repeatable); systemd, udev, cloud-init and "
                        "openssh-server are always in")
    b.add_argument("--kernel-deb", dest="kernel_debs", action="append", default=[], type=Path, metavar="DEB",
                   help="the slice kernel's linux-image .deb, installed inside the image (modules match) instead "
                        "of the suite's linux-image-amd64 (repeatable; --debian only)")
    b.add_argument("--label", default="cloudimg-rootfs", help="ext4 label, booted as root=LABEL=... (default: %(default)s)")
    b.add_argument("--out-dir", required=True, type=Path, metavar="DIR",
                   help="where vmlinuz, initrd.img and image.json go (coreslice boot --image DIR); its name is the "
                        "default hostname")
    b.add_argument("--cloud-config", type=Path, metavar="FILE", help="cloud-init user-data (#cloud-config YAML)")
    b.add_argument("--ssh-key", dest="ssh_keys", action="append", default=[], type=Path, metavar="FILE",
                   help="an OpenSSH public key for the image's default user (repeatable)")
    b.add_argument("--hostname", help="the slice's hostname (default: the cloud-config's, else the out-dir's name)")
    b.add_argument("--instance-id", help="cloud-init instance-id (default: derived from the seed, so a new seed "
                                         "runs cloud-init again)")
    b.add_argument("--network", metavar="dhcp|ADDR/LEN[,GW[,DNS]]",
                   help="network config for the slice's NIC: DHCP or a static address")
    b.add_argument("--nic-mac", metavar="MAC", help="match the NIC by MAC (default: the first en* interface)")
    b.add_argument("--force", action="store_true", help="overwrite an existing target file or out-dir image")
    b.add_argument("--json", action="store_true", help="print one JSON object: sizes, partition, label, kernel, times")
    b.add_argument("--quiet", action="store_true", help="no progress lines")
    b.set_defaults(func=cmd_build)


def _progress(quiet: bool):
    t0 = time.monotonic()

    def say(msg: str) -> None:
        if not quiet:
            print(f"[image {time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)
    return say


def cmd_build(args) -> int:
    from coreslice.image.build import BuildRequest, build

    req = BuildRequest(target=args.target, out_dir=args.out_dir, size=args.size, rootfs=args.rootfs,
                       sha256=args.sha256, debian=args.debian, packages=_packages(args.packages),
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


def _packages(items: list[str]) -> tuple[str, ...]:
    from coreslice.image.rootfs import check_packages
    return check_packages(items)
