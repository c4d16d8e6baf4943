"""SR-IOV virtual functions for slices: requests, every check, and the slice kernel's parameters.

``--nic-vf PF:INDEX`` and ``--nvme-vf PF:INDEX`` do what the prototype's run_common.sh did
(launch/vfprep.py makes the changes):

- NIC: enable the VFs once (``sriov_drivers_autoprobe`` 0 so no host driver grabs them, then
  ``sriov_numvfs`` = ``sriov_totalvfs``), set the VF's MAC through netlink (IFLA_VF_MAC on the
  PF's interface), find the VF (``virtfnN``), unbind it from any host driver.
- NVMe: before the VFs exist, give every secondary controller its flexible resources with the
  Virtualization Management command (NVMe Base Spec 2.0 §5.22: RT 0 = VQ, 1 = VI; ACT 8 =
  Secondary Assign, 9 = Secondary Online, 7 = Secondary Offline), sized from the Primary
  Controller Capabilities (Identify CNS 14h, §5.17.2.13: VQFRT/VIFRT flexible totals, VQFRSM/
  VIFRSM maximum per secondary, VQGRAN/VIGRAN granularity); enable the VFs; bring this VF's
  secondary controller online (its VFN is INDEX + 1, Secondary Controller List CNS 15h); find
  the VF; unbind it.

Every check runs in :func:`check`, before any change, reading through :class:`SriovOps`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from coreslice.config import SriovConfig, parse_mac
from coreslice.errors import UsageError
from coreslice.host import consoles
from coreslice.machine.sriov import PrimaryCaps, SriovOps

# PCI Code and ID Assignment Spec §1.3/§1.2: base class 02h network; 01:08:02 NVM Express (NVMe I/O).
NIC_BASE_CLASS = 0x02
NVME_CLASS = 0x010802
KINDS = ("nic", "nvme")


STOCK_VF_REFUSAL = ("a stock kernel cannot drive an SR-IOV VF: it sees the VF's physical function on the same "
                    "root bus, probes it and resets SR-IOV, which removes the VFs of every slice; use "
                    "--guest-kernel slice (the prototype's kernel with permit_probe_only and pci-vf-as-pf), "
                    "or give the slice a whole function on a root bus of its own with --device")


# ---------------------------------------------------------------------------------------------
# Requests

@dataclass(frozen=True)
class VfRequest:
    kind: str           # "nic" or "nvme"
    pf: str             # normalized PCI address of the physical function
    index: int          # VF index, 0-based (sysfs virtfnN; NVMe VFN = index + 1)
    mac: str | None = None

    @property
    def flag(self) -> str:
        return f"--{self.kind}-vf {self.pf}:{self.index}"


def parse_vf(text: str, kind: str) -> VfRequest:
    """``PF:INDEX`` (``0000:99:00.0:3``) -> VfRequest."""
    pf_text, sep, idx = text.rpartition(":")
    pf = consoles.normalize_pci_address(pf_text) if sep else None
    # ASCII digits only (str.isdigit also takes '²'); NumVFs is a 16-bit field (SR-IOV §3.3.7).
    if pf is None or not re.fullmatch(r"[0-9]{1,5}", idx) or int(idx) > 0xFFFF:
        raise UsageError(f"--{kind}-vf '{text}' is not PF:INDEX; write the physical function's PCI address and "
                         f"the VF index, e.g. --{kind}-vf 0000:99:00.0:0")
    return VfRequest(kind, pf, int(idx))


def with_mac(reqs: Sequence[VfRequest], mac: str | None) -> list[VfRequest]:
    """Attach ``--mac`` to the one NIC request (refused without exactly one)."""
    if mac is None:
        return list(reqs)
    nics = [r for r in reqs if r.kind == "nic"]
    if len(nics) != 1:
        raise UsageError("--mac goes with exactly one --nic-vf; give one --nic-vf, or drop --mac to use the "
                         "config's mac_base + index")
    parse_mac(mac, "--mac")
    return [VfRequest(r.kind, r.pf, r.index, mac.lower()) if r.kind == "nic" else r for r in reqs]


# ---------------------------------------------------------------------------------------------
# Checks (no change)

def vf_address(pf: str, offset: int, stride: int, index: int) -> str | None:
    """The PCI address VF ``index`` of ``pf`` will have, before the VFs exist: its Routing ID is
    the PF's plus First VF Offset plus index times VF Stride (PCIe Base Spec, SR-IOV Extended
    Capability, "First VF Offset" and "VF Stride"; sysfs sriov_offset, sriov_stride).  None when
    that leaves the 8-bit bus range."""
    seg, bus, devfn = pf[:4], int(pf[5:7], 16), int(pf[8:10], 16) << 3 | int(pf[11], 16)
    rid = (bus << 8 | devfn) + offset + index * stride
    if rid > 0xFFFF:
        return None
    return f"{seg}:{rid >> 8:02x}:{(rid >> 3) & 0x1F:02x}.{rid & 7}"


@dataclass
class Checked:
    req: VfRequest
    total: int
    enabled: int                    # sriov_numvfs now
    vf: str | None = None           # the VF's address: read when enabled, else derived
    mac: str | None = None          # NIC: the MAC to set
    ifname: str | None = None
    dev: str | None = None          # NVMe: /dev/nvmeN
    vq: int = 0                     # NVMe: resources per secondary
    vi: int = 0


def _int_attr(ops: SriovOps, addr: str, name: str) -> int | None:
    v = ops.attr(addr, name)
    try:
        return int(v, 0) if v is not None else None
    except ValueError:
        return None


def _per_secondary(caps: PrimaryCaps, n: int, cfg: SriovConfig, pf: str) -> tuple[int, int]:
    """Flexible VQ and VI per secondary: the config's, else an even share of what the primary
    does not keep, capped at VQFRSM/VIFRSM and rounded down to the granularity."""
    out = []
    for what, total, primary, cap, gran, want, least in (
            ("VQ", caps.vqfrt, caps.vqrfap, caps.vqfrsm, caps.vqgran, cfg.nvme_vq_per_vf, 2),
            ("VI", caps.vifrt, caps.virfap, caps.vifrsm, caps.vigran, cfg.nvme_vi_per_vf, 1)):
        free = total - primary
        share = want if want is not None else min(cap or free, free // max(n, 1))
        g = max(gran, 1)
        share -= share % g if want is None else 0
        key = f"nvme_{what.lower()}_per_vf"
        if share < least:
            raise UsageError(f"NVMe PF {pf}: {free} flexible {what} resources for {n} secondary controllers "
                             f"(primary keeps {primary}) leave {share} each, a secondary needs {least}; "
                             f"set sriov.{key} in the config, or enable fewer VFs")
        if share * n > free or (cap and share > cap) or share % g:
            raise UsageError(f"NVMe PF {pf}: sriov.{key} = {share} does not fit ({free} free {what} for {n} "
                             f"secondaries, at most {cap} each, granularity {g}); lower it")
        out.append(share)
    return out[0], out[1]


def check(reqs: Sequence[VfRequest], ops: SriovOps, cfg: SriovConfig, held: dict[str, str]) -> list[Checked]:
    """Every refusal, before any change.  ``held``: PCI function -> name of the slice holding it."""
    out: list[Checked] = []
    seen: set[tuple[str, int]] = set()
    kind_of_pf: dict[str, str] = {}
    for r in reqs:
        if (r.pf, r.index) in seen:
            raise UsageError(f"{r.flag} is given twice; name each VF once")
        seen.add((r.pf, r.index))
        if kind_of_pf.setdefault(r.pf, r.kind) != r.kind:
            raise UsageError(f"{r.pf} is given both as --nic-vf and --nvme-vf; a PF is one or the other")
        cls = _int_attr(ops, r.pf, "class")
        if cls is None:
            raise UsageError(f"{r.flag}: no PCI function {r.pf} on this host; pass a PF that "
                             "'coreslice host show' lists")
        if r.kind == "nic" and cls >> 16 != NIC_BASE_CLASS:
            raise UsageError(f"{r.flag}: {r.pf} is not a NIC (class 0x{cls:06x}, a network controller is 0x02xxxx); "
                             "pass the NIC's physical function, or use --nvme-vf for an NVMe controller")
        if r.kind == "nvme" and cls != NVME_CLASS:
            raise UsageError(f"{r.flag}: {r.pf} is not an NVMe controller (class 0x{cls:06x}, NVMe is 0x010802); "
                             "pass the NVMe physical function, or use --nic-vf for a NIC")
        if ops.attr(r.pf, "physfn") is not None:
            raise UsageError(f"{r.flag}: {r.pf} is itself a VF (of {ops.attr(r.pf, 'physfn')}); pass its physical function")
        total = _int_attr(ops, r.pf, "sriov_totalvfs")
        if not total:
            raise UsageError(f"{r.flag}: {r.pf} is not SR-IOV capable (no sriov_totalvfs{'' if total is None else ' > 0'}); "
                             "pass a physical function with SR-IOV (and its host driver loaded)")
        if r.index >= total:
            raise UsageError(f"{r.flag}: {r.pf} has {total} VFs (indices 0-{total - 1}); choose an index below {total}")
        if ops.driver(r.pf) is None:
            raise UsageError(f"{r.flag}: {r.pf} has no host driver; the PF's driver creates the VFs "
                             f"(and runs {'netlink' if r.kind == 'nic' else 'virtualization management'}): load it first")
        enabled = _int_attr(ops, r.pf, "sriov_numvfs") or 0
        if enabled and enabled != total:
            raise UsageError(f"{r.flag}: {r.pf} has {enabled} of {total} VFs enabled by someone else; "
                             f"coreslice enables all of them: write 0 to /sys/bus/pci/devices/{r.pf}/sriov_numvfs first")
        if r.pf in held:
            raise UsageError(f"{r.flag}: the PF {r.pf} itself is held by slice '{held[r.pf]}'; stop that slice first")
        if enabled:
            vf = ops.virtfn(r.pf, r.index)
        else:
            offset, stride = _int_attr(ops, r.pf, "sriov_offset"), _int_attr(ops, r.pf, "sriov_stride")
            if offset is None or stride is None:
                raise UsageError(f"{r.flag}: {r.pf} does not show its SR-IOV First VF Offset and Stride "
                                 "(sysfs sriov_offset, sriov_stride), so the VF's address cannot be known before "
                                 "its VFs exist; use a kernel that shows them (Linux 4.x+), or enable the VFs "
                                 "first with 'coreslice sriov prepare'")
            vf = vf_address(r.pf, offset, stride, r.index)
            if vf is None:
                raise UsageError(f"{r.flag}: VF {r.index} of {r.pf} (offset {offset}, stride {stride}) would lie past "
                                 "bus ff; choose a lower index")
        c = Checked(r, total, enabled, vf=vf)
        if c.vf and c.vf in held:
            raise UsageError(f"{r.flag}: VF {c.vf} is held by slice '{held[c.vf]}'; choose another index, "
                             f"or stop that slice (coreslice stop {held[c.vf]})")
        if r.kind == "nic":
            c.ifname = ops.netdev(r.pf)
            if c.ifname is None:
                raise UsageError(f"{r.flag}: {r.pf} has no network interface; bind it to its host driver so "
                                 "that the VF's MAC can be set through it")
            c.mac = r.mac or cfg.default_mac(r.pf, r.index)
            parse_mac(c.mac, "--mac" if r.mac else "the default MAC (sriov.mac_base + index)")
        else:
            c.dev = ops.nvme_dev(r.pf)
            if c.dev is None:
                raise UsageError(f"{r.flag}: {r.pf} has no NVMe controller device (/dev/nvmeN); bind it to the "
                                 "nvme driver first")
            caps = ops.primary_caps(c.dev)
            secs = {s.vfn: s for s in ops.secondaries(c.dev)}
            if r.index + 1 not in secs:
                raise UsageError(f"{r.flag}: {r.pf} lists no secondary controller for VF {r.index} "
                                 f"(VFN {r.index + 1}); choose an index it lists (nvme list-secondary {c.dev})")
            c.vq, c.vi = _per_secondary(caps, total, cfg, r.pf)
            s = secs[r.index + 1]
            if enabled and (s.vq < 2 or s.vi < 1) and not s.online:
                raise UsageError(f"{r.flag}: the VFs of {r.pf} are enabled but secondary controller {s.scid} has "
                                 f"{s.vq} VQ and {s.vi} VI (needs 2 and 1): resources are assigned only before the "
                                 f"VFs exist: write 0 to /sys/bus/pci/devices/{r.pf}/sriov_numvfs and retry")
        out.append(c)
    return out


def host_with_vfs(host, checked: Sequence[Checked]):
    """The host as it will be once the checked VFs are enabled: their functions added (class of
    their PF, no driver), so that the PCI plan checks them before anything is enabled."""
    import copy
    import dataclasses

    from coreslice.host.pci import Function

    topo = host.pci
    new = []
    for c in checked:
        if c.vf and topo.function(c.vf) is None:
            pf = topo.function(c.req.pf)
            new.append(Function(c.vf, pf.class_code if pf else None, pf.vendor if pf else None,
                                physfn=c.req.pf, numa_node=pf.numa_node if pf else None))
    if not new:
        return host
    view = copy.copy(host)
    view.pci = dataclasses.replace(topo, functions=[*topo.functions, *new])
    return view


# ---------------------------------------------------------------------------------------------
# Kernel command line (the prototype's slice kernel)

def slice_kernel_params(prepared: Sequence, other_functions: Sequence[str]) -> tuple[str, str]:
    """(permit_probe_only value, pci-vf-as-pf parameters) as the prototype's runslice.sh wrote
    them: functions without the segment, ';'-separated; the PFs ','-separated; one VF index."""
    indices = {v.index for v in prepared}
    if len(indices) > 1:
        raise UsageError(f"the slice kernel's pci-vf-as-pf driver takes one VF index for all PFs, got "
                         f"{', '.join(map(str, sorted(indices)))}; use the same INDEX for --nic-vf and --nvme-vf")

    def short(a: str) -> str:
        return a[5:] if a.startswith("0000:") else a

    permit = ";".join(short(a) for a in [*other_functions, *(v.address for v in prepared)])
    vf = f"pci-vf-as-pf.pf={','.join(short(v.pf) for v in prepared)} pci-vf-as-pf.vf={indices.pop()}" if prepared else ""
    return permit, vf


# ---------------------------------------------------------------------------------------------
# `coreslice host show`: PFs, their VFs and who holds them (pure)

def pf_table(functions, held: dict[str, str], nic_pfs: Sequence[str] = (), nvme_pfs: Sequence[str] = ()) -> list[dict]:
    """One entry per SR-IOV PF (or PF named in the config), its VFs in routing-ID order (the
    kernel's virtfnN order: First VF Offset + N * VF Stride, SR-IOV §9.3.3.9-10) and holders."""
    by_addr = {f.address: f for f in functions}
    pfs = [f for f in functions if f.sriov_totalvfs] + \
          [by_addr[a] for a in [*nic_pfs, *nvme_pfs] if a in by_addr and not by_addr[a].sriov_totalvfs]
    out = []
    for pf in pfs:
        cls = pf.class_code or 0
        kind = "nic" if cls >> 16 == NIC_BASE_CLASS else "nvme" if cls == NVME_CLASS else "other"
        vfs = sorted((f for f in functions if f.physfn == pf.address),
                     key=lambda f: (f.segment, f.bus, f.address))
        out.append({"address": pf.address, "kind": kind, "driver": pf.driver,
                    "configured": pf.address in nic_pfs or pf.address in nvme_pfs,
                    "numvfs": pf.sriov_numvfs, "totalvfs": pf.sriov_totalvfs, "held_by": held.get(pf.address),
                    "vfs": [{"index": i, "address": v.address, "driver": v.driver, "held_by": held.get(v.address)}
                            for i, v in enumerate(vfs)]})
    return out


def format_pf_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["SR-IOV: no physical functions"]
    out = ["SR-IOV physical functions:"]
    for p in rows:
        out.append(f"  {p['address']}  {p['kind']:<5} {p['driver'] or '-'}  {p['numvfs']}/{p['totalvfs']} VFs"
                   + ("  (config)" if p["configured"] else ""))
        for v in p["vfs"]:
            out.append(f"    VF {v['index']:<3} {v['address']}  {v['driver'] or '-':<10} "
                       f"{('slice ' + v['held_by']) if v['held_by'] else 'free'}")
    return out
