"""What ``coreslice native-setup --like NAME`` gives the host, decided before any change (issue 13
section 2): the native baseline is the host itself, booted on a slice's CPU count and memory
(the native-eval profile), with the slice's own SR-IOV VFs bound to host drivers, because a VF
is not its PF (an NVMe VF has fewer queues, a NIC VF its own MAC and rate limits), so the
comparison must use the same functions the slice drives.

The slice is found as ``coreslice vm --like`` finds it (the ledger's newest row of that name, of
any host boot: the native-eval boot is another boot), else as declared in the slices directory
(/etc/coreslice/slices/NAME.toml).  Its recorded boot request says which VFs it had.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from coreslice import config as configmod
from coreslice.errors import UsageError
from coreslice.image.cloudinit import parse_network
from coreslice.plan.vfs import VfRequest, parse_vf, with_mac
from coreslice.request import slice_defaults
from coreslice.units import format_size, parse_memory, parse_size


@dataclass(frozen=True)
class NativeSlice:
    """The slice whose devices the host takes."""

    name: str
    source: str                     # where it was found, for messages and --json
    ncpus: int
    mem_size: int
    kernel: str | None
    vfs: tuple[VfRequest, ...]
    devices: tuple[str, ...]        # whole functions: the native host drives them anyway
    config: Path | None             # the slice's --config (MAC base, NVMe resources)
    address: str | None             # the NIC's IPv4 ADDR/LEN from its image's network config

    def to_json(self) -> dict:
        return {"name": self.name, "source": self.source, "ncpus": self.ncpus, "memory": self.mem_size,
                "kernel": self.kernel, "address": self.address, "devices": list(self.devices),
                "vfs": [{"kind": v.kind, "pf": v.pf, "index": v.index, "mac": v.mac} for v in self.vfs]}


def _vfs(args: argparse.Namespace) -> tuple[VfRequest, ...]:
    reqs = [parse_vf(t, "nic") for t in args.nic_vfs] + [parse_vf(t, "nvme") for t in args.nvme_vfs]
    return tuple(with_mac(reqs, args.mac))


def _image_address(image: str | None) -> str | None:
    """The static address the slice's image configures (None: DHCP, no network, no image)."""
    if image is None:
        return None
    from coreslice.image.build import load_manifest
    try:
        seed = load_manifest(image).get("seed") or {}
    except UsageError:
        return None  # the image is gone (another boot); --address then says it
    addr = seed.get("address")
    return addr if isinstance(addr, str) else None


def from_args(name: str, source: str, args: argparse.Namespace, *, ncpus: int | None, mem_size: int | None,
              kernel: str | None) -> NativeSlice:
    """The boot request ``args`` (the boot parser's) of slice ``name``; CPU count and memory from
    the ledger row when given, else from the request and the config's [slice] defaults."""
    if ncpus is None or mem_size is None:
        cfg = configmod.load(args.config)
        n, mem = slice_defaults(args.cpus, args.ncpus, args.memory, cfg)
        ncpus = len(args.cpus) if args.cpus else n
        mem_size = parse_memory(mem)[0]
    return NativeSlice(name=name, source=source, ncpus=ncpus, mem_size=mem_size, kernel=kernel, vfs=_vfs(args),
                       devices=tuple(args.devices), config=args.config, address=_image_address(args.image))


def check_address(text: str) -> str:
    """``--address ADDR/LEN`` (IPv4, as image build's --network writes it) -> normalized."""
    if "," in text:
        raise UsageError(f"--address {text!r}: give only ADDR/LEN (e.g. 10.99.1.2/24); the host keeps its own routes")
    addr = parse_network(text).address
    if addr is None:
        raise UsageError(f"--address {text!r}: give a static ADDR/LEN such as 10.99.1.2/24, not dhcp")
    return addr


# -- the host's boot profile -----------------------------------------------------------------------

def _param(cmdline: str, key: str) -> str | None:
    """The last ``key=value`` of the command line (the kernel's own rule: the last one wins)."""
    found = re.findall(rf"(?:^|\s){re.escape(key)}=(\S+)", cmdline)
    return found[-1] if found else None


def profile_gaps(cmdline: str, online_cpus: int, sl: NativeSlice) -> list[str]:
    """How the running host differs from the native-eval profile for ``sl`` (host/profiles.py):
    the slice's CPU count online, RAM limited to its size by mem=, no IOMMU translation (as the
    slice-host boot, where the slice's devices DMA untranslated)."""
    gaps = []
    if online_cpus != sl.ncpus:
        gaps.append(f"{online_cpus} CPUs online, the slice has {sl.ncpus} (maxcpus={_param(cmdline, 'maxcpus') or 'unset'})")
    mem = _param(cmdline, "mem")
    try:
        size = parse_size(mem, "mem=") if mem else None
    except UsageError:
        size = None
    if size != sl.mem_size:
        gaps.append(f"mem={mem or 'unset'}, the slice has {format_size(sl.mem_size)}")
    if _param(cmdline, "intel_iommu") not in ("off", None) or _param(cmdline, "iommu") == "pt":
        gaps.append("the IOMMU translates DMA (intel_iommu=on), the slice's devices run without it")
    return gaps


def profile_fix(sl: NativeSlice) -> str:
    return (f"coreslice host configure --profile native-eval --host-cpus {sl.ncpus} --host-mem "
            f"{format_size(sl.mem_size)}, and reboot")
