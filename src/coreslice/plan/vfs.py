"""SR-IOV virtual functions for slices: check, prepare on the host, undo.

``--nic-vf PF:INDEX`` and ``--nvme-vf PF:INDEX`` do what the prototype's run_common.sh did:

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

Every check runs in :func:`check`, before any change.  :func:`prepare` logs each change it makes
and, if a later step fails, undoes them in reverse order and says so in the error.  All side
effects go through :class:`SriovOps` (real: sysfs, pyroute2, nvme-cli; fake: in memory).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from coreslice.config import SriovConfig, format_mac, parse_mac
from coreslice.errors import LaunchError, UsageError
from coreslice.host import consoles

# PCI Code and ID Assignment Spec §1.3/§1.2: base class 02h network; 01:08:02 NVM Express (NVMe I/O).
NIC_BASE_CLASS = 0x02
NVME_CLASS = 0x010802
# Virtualization Management (NVMe Base Spec 2.0 §5.22, Figure 419/420).
RT_VQ, RT_VI = 0, 1
ACT_OFFLINE, ACT_ASSIGN, ACT_ONLINE = 7, 8, 9
KINDS = ("nic", "nvme")


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
    if pf is None or not idx.isdigit():
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
# The side-effect interface

@dataclass
class Secondary:
    """One entry of the Secondary Controller List (NVMe Base Spec 2.0 Figure 287)."""

    scid: int      # secondary controller identifier (its CNTLID)
    vfn: int       # virtual function number, 1-based
    online: bool
    vq: int        # flexible queue resources assigned
    vi: int        # flexible interrupt resources assigned


@dataclass
class PrimaryCaps:
    """Primary Controller Capabilities (NVMe Base Spec 2.0 Figure 286), the fields used here."""

    vqfrt: int      # VQ flexible resources total
    vqrfap: int     # VQ flexible resources allocated to the primary
    vqfrsm: int     # VQ flexible resources maximum per secondary
    vqgran: int     # VQ granularity
    vifrt: int
    virfap: int
    vifrsm: int
    vigran: int


class SriovOps(Protocol):
    def attr(self, address: str, name: str) -> str | None: ...           # sysfs attribute, stripped
    def write_attr(self, address: str, name: str, value: str) -> None: ...
    def virtfn(self, pf: str, index: int) -> str | None: ...             # VF address (virtfnN link)
    def driver(self, address: str) -> str | None: ...
    def unbind(self, address: str) -> None: ...
    def bind(self, address: str, driver: str) -> None: ...
    def netdev(self, pf: str) -> str | None: ...                         # the PF's interface name
    def vf_mac(self, ifname: str, index: int) -> str | None: ...
    def set_vf_mac(self, ifname: str, index: int, mac: str) -> None: ...
    def nvme_dev(self, pf: str) -> str | None: ...                       # /dev/nvmeN of the PF
    def primary_caps(self, dev: str) -> PrimaryCaps: ...
    def secondaries(self, dev: str) -> list[Secondary]: ...
    def virt_mgmt(self, dev: str, cntlid: int, rt: int, act: int, nr: int) -> None: ...


# ---------------------------------------------------------------------------------------------
# Checks (no change)

@dataclass
class Checked:
    req: VfRequest
    total: int
    enabled: int                    # sriov_numvfs now
    vf: str | None = None           # known when the VFs are already enabled
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
        c = Checked(r, total, enabled, vf=ops.virtfn(r.pf, r.index) if enabled else None)
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


# ---------------------------------------------------------------------------------------------
# Prepare and undo

@dataclass
class PreparedVf:
    kind: str
    pf: str
    index: int
    address: str
    mac: str | None = None
    secondary: int | None = None        # NVMe secondary controller id
    unbound_from: str | None = None

    def to_json(self) -> dict:
        return {"kind": self.kind, "pf": self.pf, "index": self.index, "address": self.address,
                "mac": self.mac, "secondary_controller": self.secondary, "unbound_from": self.unbound_from}


@dataclass
class Preparation:
    vfs: list[PreparedVf] = field(default_factory=list)
    undo_log: list[tuple[str, Callable[[], None]]] = field(default_factory=list)  # (what, how to undo)
    done: list[str] = field(default_factory=list)

    def undo(self) -> list[str]:
        """Undo every logged change, newest first; returns what could not be undone."""
        failed = []
        while self.undo_log:
            what, fn = self.undo_log.pop()
            try:
                fn()
            except Exception as e:  # keep undoing the rest
                failed.append(f"{what} ({e})")
        return failed


def _enable(ops: SriovOps, c: Checked, prep: Preparation, progress) -> None:
    pf = c.req.pf
    old = ops.attr(pf, "sriov_drivers_autoprobe")
    if old != "0":
        ops.write_attr(pf, "sriov_drivers_autoprobe", "0")
        prep.undo_log.append((f"sriov_drivers_autoprobe of {pf}", lambda: ops.write_attr(pf, "sriov_drivers_autoprobe", old or "1")))
    progress(f"enabling {c.total} VFs of {pf}")
    ops.write_attr(pf, "sriov_numvfs", str(c.total))
    prep.undo_log.append((f"VFs of {pf}", lambda: ops.write_attr(pf, "sriov_numvfs", "0")))
    prep.done.append(f"enabled {c.total} VFs of {pf}")


def _assign_resources(ops: SriovOps, c: Checked, prep: Preparation, progress) -> None:
    dev = c.dev
    assert dev is not None
    for s in ops.secondaries(dev):
        for rt, want, have, name in ((RT_VQ, c.vq, s.vq, "VQ"), (RT_VI, c.vi, s.vi, "VI")):
            if have == want:
                continue
            progress(f"{dev}: secondary controller {s.scid}: assign {want} {name} (virt-mgmt act 8 rt {rt})")
            ops.virt_mgmt(dev, s.scid, rt, ACT_ASSIGN, want)
            prep.undo_log.append((f"{name} of secondary {s.scid} on {dev}",
                                  lambda s=s, rt=rt, have=have: ops.virt_mgmt(dev, s.scid, rt, ACT_ASSIGN, have)))
    prep.done.append(f"assigned {c.vq} VQ + {c.vi} VI to each secondary controller of {dev}")


def _prepare_one(ops: SriovOps, c: Checked, prep: Preparation, progress) -> PreparedVf:
    r = c.req
    out = PreparedVf(r.kind, r.pf, r.index, "")
    if r.kind == "nvme":
        if not c.enabled:
            _assign_resources(ops, c, prep, progress)
            _enable(ops, c, prep, progress)
        dev = c.dev
        assert dev is not None
        s = next(x for x in ops.secondaries(dev) if x.vfn == r.index + 1)
        out.secondary = s.scid
        if not s.online:
            progress(f"{dev}: secondary controller {s.scid} (VF {r.index}) online (virt-mgmt act 9)")
            ops.virt_mgmt(dev, s.scid, RT_VQ, ACT_ONLINE, 0)
            prep.undo_log.append((f"secondary {s.scid} online", lambda: ops.virt_mgmt(dev, s.scid, RT_VQ, ACT_OFFLINE, 0)))
            now = next((x for x in ops.secondaries(dev) if x.scid == s.scid), None)
            if now is None or not now.online:
                raise LaunchError(f"secondary controller {s.scid} of {r.pf} ({dev}) did not come online "
                                  f"(nvme list-secondary {dev})")
            prep.done.append(f"secondary controller {s.scid} of {dev} online")
    elif not c.enabled:
        _enable(ops, c, prep, progress)
    vf = ops.virtfn(r.pf, r.index)
    if vf is None:
        raise LaunchError(f"{r.flag}: {r.pf} has no virtfn{r.index} after enabling its VFs")
    out.address = vf
    if r.kind == "nic":
        assert c.ifname and c.mac
        old = ops.vf_mac(c.ifname, r.index)
        progress(f"{c.ifname}: VF {r.index} MAC {c.mac}")
        ops.set_vf_mac(c.ifname, r.index, c.mac)
        if old and old != c.mac:
            prep.undo_log.append((f"MAC of VF {r.index} on {c.ifname}", lambda: ops.set_vf_mac(c.ifname, r.index, old)))
        out.mac = c.mac
        prep.done.append(f"VF {r.index} of {c.ifname} has MAC {c.mac}")
    drv = ops.driver(vf)
    if drv is not None:
        progress(f"unbinding VF {vf} from {drv}")
        ops.unbind(vf)
        prep.undo_log.append((f"driver {drv} of {vf}", lambda: ops.bind(vf, drv)))
        out.unbound_from = drv
        prep.done.append(f"unbound {vf} from {drv}")
    return out


def prepare(checked: Sequence[Checked], ops: SriovOps, progress: Callable[[str], None] = lambda _m: None) -> Preparation:
    """Make the changes; on any failure undo them all and raise LaunchError saying so."""
    prep = Preparation()
    try:
        for c in checked:
            prep.vfs.append(_prepare_one(ops, c, prep, progress))
    except Exception as e:
        raise LaunchError(f"{e}; {undo_message(prep)}") from e
    return prep


def undo_message(prep: Preparation) -> str:
    if not prep.undo_log:
        return "nothing had been changed"
    n = len(prep.undo_log)
    failed = prep.undo()
    prep.vfs.clear()
    if failed:
        return f"undid {n - len(failed)} of {n} changes; could not undo: {'; '.join(failed)}: fix these by hand"
    return f"undid all {n} changes (VF MACs, secondary controllers, VF enablement, drivers) made before the failure"


# ---------------------------------------------------------------------------------------------
# Kernel command line (the prototype's slice kernel)

def slice_kernel_params(prepared: Sequence[PreparedVf], other_functions: Sequence[str]) -> tuple[str, str]:
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
# Real implementation

class RealOps:
    """sysfs under ``root``, netlink through pyroute2, nvme-cli for the admin commands."""

    def __init__(self, root: Path = Path("/"), run: Callable[..., subprocess.CompletedProcess] = subprocess.run):
        self.root = root
        self._run = run

    def _dev(self, address: str) -> Path:
        return self.root / "sys/bus/pci/devices" / address

    def attr(self, address: str, name: str) -> str | None:
        p = self._dev(address) / name
        if name == "physfn":
            return p.resolve().name if p.exists() else None
        try:
            return p.read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write_attr(self, address: str, name: str, value: str) -> None:
        try:
            (self._dev(address) / name).write_text(value)
        except OSError as e:
            raise LaunchError(f"writing {value} to {self._dev(address) / name} failed: {e.strerror}") from e

    def virtfn(self, pf: str, index: int) -> str | None:
        p = self._dev(pf) / f"virtfn{index}"
        return p.resolve().name if p.exists() else None

    def driver(self, address: str) -> str | None:
        p = self._dev(address) / "driver"
        return p.resolve().name if p.exists() else None

    def unbind(self, address: str) -> None:
        self.write_attr(address, "driver/unbind", address)

    def bind(self, address: str, driver: str) -> None:
        (self.root / "sys/bus/pci/drivers" / driver / "bind").write_text(address)

    def netdev(self, pf: str) -> str | None:
        d = self._dev(pf) / "net"
        names = sorted(os.listdir(d)) if d.is_dir() else []
        return names[0] if names else None

    def vf_mac(self, ifname: str, index: int) -> str | None:
        try:
            from pyroute2 import IPRoute
            with IPRoute() as ipr:
                (msg,) = ipr.link("get", ifname=ifname, ext_mask=1)
                vfs = msg.get_attr("IFLA_VFINFO_LIST")
                for info in vfs.get_attrs("IFLA_VF_INFO") if vfs else []:
                    m = info.get_attr("IFLA_VF_MAC")
                    if m and m.get("vf") == index:
                        return str(m.get("mac")).lower()
        except Exception:
            return None
        return None

    def set_vf_mac(self, ifname: str, index: int, mac: str) -> None:
        try:
            from pyroute2 import IPRoute
        except ImportError as e:
            raise LaunchError("pyroute2 is not installed; pip install pyroute2 (a coreslice dependency)") from e
        try:
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=ifname)
                if not idx:
                    raise LaunchError(f"network interface {ifname} has gone")
                ipr.link("set", index=idx[0], vf={"vf": index, "mac": mac})
        except LaunchError:
            raise
        except Exception as e:
            raise LaunchError(f"setting the MAC of VF {index} on {ifname} through netlink failed: {e}") from e

    def nvme_dev(self, pf: str) -> str | None:
        d = self._dev(pf) / "nvme"
        names = sorted(n for n in os.listdir(d) if n.startswith("nvme")) if d.is_dir() else []
        return f"/dev/{names[0]}" if names else None

    def _nvme(self, *args: str) -> str:
        cmd = ["nvme", *args]
        try:
            p = self._run(cmd, capture_output=True, text=True, timeout=30)
        except FileNotFoundError as e:
            raise LaunchError("nvme-cli is not installed; apt-get install nvme-cli") from e
        if p.returncode != 0:
            raise LaunchError(f"{' '.join(cmd)} failed (exit {p.returncode}): {(p.stderr or p.stdout).strip()}")
        return p.stdout

    def primary_caps(self, dev: str) -> PrimaryCaps:
        try:
            d = json.loads(self._nvme("primary-ctrl-caps", dev, "--output-format=json"))
        except LaunchError as e:
            raise UsageError(f"{e}; the PF must support Virtualization Management (primary controller)") from None
        return parse_primary_caps(d)

    def secondaries(self, dev: str) -> list[Secondary]:
        return parse_secondaries(json.loads(self._nvme("list-secondary", dev, "--output-format=json")))

    def virt_mgmt(self, dev: str, cntlid: int, rt: int, act: int, nr: int) -> None:
        self._nvme("virt-mgmt", dev, f"--cntlid={cntlid}", f"--rt={rt}", f"--act={act}", f"--nr={nr}")


def _num(v) -> int:
    return int(v, 0) if isinstance(v, str) else int(v)


def parse_primary_caps(d: dict) -> PrimaryCaps:
    return PrimaryCaps(**{k: _num(d.get(k, 0)) for k in
                          ("vqfrt", "vqrfap", "vqfrsm", "vqgran", "vifrt", "virfap", "vifrsm", "vigran")})


def parse_secondaries(d: dict) -> list[Secondary]:
    """nvme-cli's list-secondary JSON (key names differ between versions)."""
    rows = d.get("secondary-controllers") or d.get("secondary_controllers") or d.get("sc-entry") or []
    out = []
    for e in rows:
        def get(*names):
            for n in names:
                if n in e:
                    return _num(e[n])
            return 0
        out.append(Secondary(scid=get("secondary-controller-identifier", "scid"),
                             vfn=get("virtual-function-number", "vfn"),
                             online=bool(get("secondary-controller-state", "scs") & 1),
                             vq=get("num-virtual-queues", "nvq"),
                             vi=get("num-virtual-interrupts", "nvi")))
    return out


def mac_text(value: int) -> str:
    return format_mac(value)


# ---------------------------------------------------------------------------------------------
# In-memory fake (unit tests; CORESLICE_FAKE_MACHINE)

class FakeOps:
    """A host with SR-IOV PFs in memory.  ``add_pf`` creates one; VFs appear at bus+0x10 when
    sriov_numvfs is written.  ``fail_online`` makes secondary controllers stay offline."""

    def __init__(self):
        self.devs: dict[str, dict] = {}
        self.macs: dict[tuple[str, int], str] = {}
        self.secs: dict[str, list[Secondary]] = {}
        self.caps: dict[str, PrimaryCaps] = {}
        self.log: list[str] = []
        self.fail_online = False

    def add_pf(self, addr: str, cls: int, total: int, driver: str | None = "drv", ifname: str | None = None,
               nvme: str | None = None, caps: PrimaryCaps | None = None) -> None:
        self.devs[addr] = {"class": f"0x{cls:06x}", "sriov_totalvfs": str(total), "sriov_numvfs": "0",
                           "sriov_drivers_autoprobe": "1", "driver": driver, "net": ifname, "nvme": nvme}
        if nvme:
            self.caps[nvme] = caps or PrimaryCaps(2 * total, 0, 2, 1, total, 0, 1, 1)
            self.secs[nvme] = [Secondary(i + 1, i + 1, False, 0, 0) for i in range(total)]

    def _vf_addr(self, pf: str, i: int) -> str:
        bus = int(pf[5:7], 16) + 0x10
        return f"{pf[:5]}{bus:02x}:{(i >> 3) + 1:02x}.{i & 7}"

    def attr(self, address, name):
        d = self.devs.get(address)
        if d is None:
            return None
        v = d.get(name)
        return None if v is None else str(v)

    def write_attr(self, address, name, value):
        self.log.append(f"write {address} {name}={value}")
        d = self.devs[address]
        d[name] = value
        if name == "sriov_numvfs":
            for i in range(int(d["sriov_totalvfs"])):
                self.devs.pop(self._vf_addr(address, i), None)
            for i in range(int(value)):
                self.devs[self._vf_addr(address, i)] = {
                    "class": d["class"], "physfn": address,
                    "driver": None if d["sriov_drivers_autoprobe"] == "0" else "vfdrv"}

    def virtfn(self, pf, index):
        n = int(self.devs.get(pf, {}).get("sriov_numvfs", 0))
        return self._vf_addr(pf, index) if index < n else None

    def driver(self, address):
        return self.devs.get(address, {}).get("driver")

    def unbind(self, address):
        self.log.append(f"unbind {address}")
        self.devs[address]["driver"] = None

    def bind(self, address, driver):
        self.log.append(f"bind {address} {driver}")
        self.devs[address]["driver"] = driver

    def netdev(self, pf):
        return self.devs.get(pf, {}).get("net")

    def vf_mac(self, ifname, index):
        return self.macs.get((ifname, index), "00:00:00:00:00:00")

    def set_vf_mac(self, ifname, index, mac):
        self.log.append(f"mac {ifname} vf {index} {mac}")
        self.macs[(ifname, index)] = mac

    def nvme_dev(self, pf):
        n = self.devs.get(pf, {}).get("nvme")
        return f"/dev/{n}" if n else None

    def primary_caps(self, dev):
        return self.caps[dev.removeprefix("/dev/")]

    def secondaries(self, dev):
        return [Secondary(**vars(s)) for s in self.secs[dev.removeprefix("/dev/")]]

    def virt_mgmt(self, dev, cntlid, rt, act, nr):
        self.log.append(f"virt-mgmt {dev} c{cntlid} rt{rt} act{act} nr{nr}")
        s = next(x for x in self.secs[dev.removeprefix("/dev/")] if x.scid == cntlid)
        if act == ACT_ASSIGN:
            if s.online:
                raise LaunchError("secondary controller is online")
            setattr(s, "vq" if rt == RT_VQ else "vi", nr)
        elif act == ACT_ONLINE and not self.fail_online:
            s.online = True
        elif act == ACT_OFFLINE:
            s.online = False


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
