"""NVMe namespaces through nvme-cli: list, create, attach (host, SR-IOV VF), detach, delete.

Every function checks first and raises :class:`UsageError` ("problem; fix", exit 2) before the
first mutating nvme-cli command; a failure after that is a :class:`CoresliceError` (exit 1).
nvme-cli runs behind :class:`NvmeCli` and sysfs is read under a root (:class:`Sysfs`), so tests
substitute recorded output and a fake tree.

Where the numbers come from (NVM Express Base Specification 2.0, cited by section title; the byte
offsets are those of the Identify Controller data structure in the Identify command section):

- OACS (Optional Admin Command Support, bytes 257:256): bit 3 = the controller supports the
  Namespace Management and Namespace Attachment commands; bit 7 = Virtualization Management.
- LPA (Log Page Attributes, byte 261): bit 1 = the Commands Supported and Effects log page
  (Get Log Page, log identifier 05h) is there.  Its admin entry for opcode 0Dh (Namespace
  Management) has bit 0 (CSUPP) set when the controller takes that command.  QEMU 10 sets OACS
  bit 3 for Namespace Attachment (opcode 15h) alone: its log has no 0Dh, and create-ns fails
  with Invalid Command Opcode (tests/unit/nvme/data/qemu10).
- TNVMCAP / UNVMCAP (bytes 295:280 / 311:296): total / unallocated NVM capacity in bytes, used
  by the Namespace Management section's create (nvme-cli prints them as decimal strings).
- NN (bytes 519:516): the largest namespace identifier; CNTLID (bytes 79:78).
- Identify Namespace (NVM Command Set): NSZE/NCAP in logical blocks; FLBAS bits 3:0 plus bits
  6:5 (as bits 5:4 of the index) select the LBA format, whose LBADS is log2 of the block size
  (nvme-cli: ``lbafs[].ds``); NSID FFFFFFFFh returns the formats common to all namespaces.
  nvme-cli's ``id-ns --force`` asks for an allocated namespace (CNS 11h), which still answers for
  one attached to another controller (plain id-ns then returns zeros, as the prototype notes).
- Namespace Attachment / Management commands: what ``attach-ns``, ``detach-ns``, ``create-ns``
  and ``delete-ns`` send; a namespace is deleted only once no controller is attached to it.
- Virtualization Management: a secondary controller (an SR-IOV VF's controller, listed by the
  Identify Secondary Controller List, CNS 15h) serves I/O only once it has flexible queue and
  interrupt resources and is Online (actions 8h assign, 9h online; see coreslice sriov).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from coreslice.errors import CoresliceError, UsageError
from coreslice.machine.sriov import Secondary, parse_secondaries

OACS_NS_MGMT = 1 << 3
OACS_VIRT_MGMT = 1 << 7
LPA_EFFECTS_LOG = 1 << 1
OPC_NS_MGMT = 0x0D
EFFECT_CSUPP = 1 << 0
NSID_ALL = 0xFFFFFFFF
LBA_SIZES = (512, 4096)

INSTALL_HINT = "install nvme-cli (apt-get install nvme-cli)"
# The nvme-cli subcommands that change the device; tests assert none ran after a refusal.
MUTATING = frozenset({"create-ns", "delete-ns", "attach-ns", "detach-ns", "virt-mgmt", "format"})


# ---------------------------------------------------------------------------------------------
# The runner and sysfs

class NvmeCli:
    """Runs ``nvme ARGS`` (with ``-o json`` for :meth:`json`); ``run`` is subprocess.run's shape."""

    def __init__(self, exe: str = "nvme", timeout: float = 60.0,
                 run: Callable[..., subprocess.CompletedProcess] = subprocess.run):
        self.exe, self.timeout, self._run = exe, timeout, run

    def text(self, *args: str) -> str:
        cmd = [self.exe, *args]
        shown = " ".join(cmd)
        try:
            p = self._run(cmd, capture_output=True, text=True, timeout=self.timeout)
        except FileNotFoundError:
            raise UsageError(f"nvme-cli ('{self.exe}') is not installed; {INSTALL_HINT}") from None
        except subprocess.TimeoutExpired:
            raise CoresliceError(f"{shown} did not finish within {self.timeout:g}s; "
                                 "check the controller (dmesg) and try again") from None
        if p.returncode != 0:
            detail = " ".join((p.stderr or p.stdout or "").split()) or "no message"
            raise CoresliceError(f"{shown} failed (exit {p.returncode}): {detail}")
        return p.stdout

    def json(self, *args: str):
        out = self.text(*args, "-o", "json")
        try:
            return json.loads(out)
        except ValueError:
            raise CoresliceError(f"{self.exe} {' '.join(args)} -o json printed no JSON: "
                                 f"{' '.join(out.split())[:120]!r}; is nvme-cli at least 2.0?") from None


class Sysfs:
    """The sysfs attributes used here, under ``root`` (``/`` on the host)."""

    def __init__(self, root: Path | str = "/"):
        self.root = Path(root)
        self.sys = self.root / "sys"

    def read(self, path: Path) -> str | None:
        try:
            return path.read_text().strip()
        except OSError:
            return None

    def ctrl_dir(self, name: str) -> Path:
        return self.sys / "class/nvme" / name

    def controllers(self) -> list[str]:
        d = self.sys / "class/nvme"
        return sorted(os.listdir(d), key=_natural) if d.is_dir() else []

    def ctrl_attr(self, name: str, attr: str) -> str | None:
        return self.read(self.ctrl_dir(name) / attr)

    def pci_address(self, name: str) -> str | None:
        link = self.ctrl_dir(name) / "device"
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    def pci_attr(self, address: str, attr: str) -> str | None:
        return self.read(self.sys / "bus/pci/devices" / address / attr)

    def ctrl_of_pci(self, address: str) -> list[str]:
        d = self.sys / "bus/pci/devices" / address / "nvme"
        return sorted(os.listdir(d), key=_natural) if d.is_dir() else []

    def block_devices(self, subsysnqn: str, nsid: int) -> list[str]:
        """Names of the block devices (``nvme0n2``; not the hidden multipath ``nvme0c0n2``)
        of namespace ``nsid`` in the subsystem ``subsysnqn``: their ``device`` is the
        nvme-subsystem (native multipath) or the controller, both with a ``subsysnqn``."""
        d = self.sys / "block"
        found = []
        for name in sorted(os.listdir(d), key=_natural) if d.is_dir() else []:
            if not re.fullmatch(r"nvme\d+n\d+", name):
                continue
            if self.read(d / name / "nsid") == str(nsid) and \
                    self.read(d / name / "device/subsysnqn") == subsysnqn:
                found.append(name)
        return found

    def mounts(self) -> list[tuple[str, str]]:
        text = self.read(self.root / "proc/mounts") or ""
        return [(f[0], f[1]) for f in (line.split() for line in text.splitlines()) if len(f) >= 2]


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _num(v) -> int:
    """nvme-cli prints 128-bit and (with old json-c) 64-bit fields as decimal strings."""
    return int(v, 0) if isinstance(v, str) else int(v)


# ---------------------------------------------------------------------------------------------
# The controller

@dataclass
class Controller:
    """An NVMe controller on this host (``nvme0``) with the runner and sysfs used to reach it."""

    name: str
    cli: NvmeCli
    sysfs: Sysfs
    settle: Callable[[], None] | None = None   # default: udevadm settle when root is /
    _info: ControllerInfo | None = field(default=None, repr=False)

    @property
    def dev(self) -> str:
        return f"/dev/{self.name}"

    @property
    def pci(self) -> str | None:
        return self.sysfs.pci_address(self.name)


def open_controller(spec: str, cli: NvmeCli | None = None, root: Path | str = "/",
                    settle: Callable[[], None] | None = None) -> Controller:
    """``/dev/nvme0``, ``nvme0`` or the controller's PCI address (``0000:8d:00.0``)."""
    sysfs = Sysfs(root)
    s = spec.strip()
    have = ", ".join(sysfs.controllers()) or "none"
    if re.fullmatch(r"(/dev/)?nvme\d+n\d+(p\d+)?", s):
        ctrl = re.match(r"(?:/dev/)?(nvme\d+)", s).group(1)
        raise UsageError(f"'{spec}' is a namespace (block device), not a controller; give the controller, "
                         f"e.g. /dev/{ctrl}")
    m = re.fullmatch(r"(?:/dev/)?(nvme\d+)", s)
    if m:
        name = m.group(1)
    elif re.fullmatch(r"([0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]", s):
        addr = (s if s.count(":") == 2 else "0000:" + s).lower()
        names = sysfs.ctrl_of_pci(addr)
        if not names:
            raise UsageError(f"PCI function {addr} has no NVMe controller bound (no "
                             f"/sys/bus/pci/devices/{addr}/nvme); bind it to the nvme driver or give "
                             f"/dev/nvmeN (controllers here: {have})")
        name = names[0]
    else:
        raise UsageError(f"'{spec}' is not an NVMe controller; give /dev/nvmeN, nvmeN or its PCI address "
                         f"(controllers here: {have})")
    if not sysfs.ctrl_dir(name).exists():
        raise UsageError(f"no NVMe controller {name} on this host; give one of: {have}")
    return Controller(name, cli or NvmeCli(), sysfs, settle)


def udev_settle(timeout: float = 10.0) -> None:
    exe = shutil.which("udevadm")
    if exe:
        subprocess.run([exe, "settle", f"--timeout={max(1, int(timeout))}"], capture_output=True,
                       timeout=timeout + 5, check=False)


@dataclass
class ControllerInfo:
    name: str
    pci: str | None
    model: str
    cntlid: int
    subnqn: str
    oacs: int
    ns_management: bool            # OACS bit 3
    ns_create: bool | None         # opcode 0Dh in the effects log (None: no such log)
    virtualization: bool           # OACS bit 7
    tnvmcap: int
    unvmcap: int
    nn: int

    def to_json(self) -> dict:
        return asdict(self)


def controller_info(ctrl: Controller) -> ControllerInfo:
    if ctrl._info is None:
        d = ctrl.cli.json("id-ctrl", ctrl.dev)
        oacs, lpa = _num(d.get("oacs", 0)), _num(d.get("lpa", 0))
        ns_create = None
        if oacs & OACS_NS_MGMT and lpa & LPA_EFFECTS_LOG:
            ns_create = _admin_supported(ctrl, OPC_NS_MGMT)
        subnqn = d.get("subnqn") or ctrl.sysfs.ctrl_attr(ctrl.name, "subsysnqn") or ""
        ctrl._info = ControllerInfo(
            name=ctrl.name, pci=ctrl.pci, model=str(d.get("mn", "")).strip(), cntlid=_num(d["cntlid"]),
            subnqn=subnqn, oacs=oacs, ns_management=bool(oacs & OACS_NS_MGMT), ns_create=ns_create,
            virtualization=bool(oacs & OACS_VIRT_MGMT), tnvmcap=_num(d.get("tnvmcap", 0)),
            unvmcap=_num(d.get("unvmcap", 0)), nn=_num(d.get("nn", 0)))
    return ctrl._info


def _admin_supported(ctrl: Controller, opcode: int) -> bool | None:
    try:
        pages = ctrl.cli.json("effects-log", ctrl.dev, "--csi=0")
    except CoresliceError:
        return None
    for page in pages if isinstance(pages, list) else [pages]:
        if _num(page.get("command_set_identifier", 0)) != 0:
            continue
        for key, effect in (page.get("admin_cmd_set") or {}).items():
            m = re.match(r"ACS_(\d+)\b", key)
            if m and int(m.group(1)) == opcode:
                return bool(_num(effect) & EFFECT_CSUPP)
        return False  # the page lists only supported commands
    return None


# ---------------------------------------------------------------------------------------------
# Namespaces

@dataclass
class LbaFormat:
    index: int
    ds: int     # LBA data size, log2
    ms: int     # metadata bytes per block
    rp: int     # relative performance, 0 best

    @property
    def lba_size(self) -> int:
        return 1 << self.ds


@dataclass
class Namespace:
    nsid: int
    blocks: int          # NSZE
    capacity: int        # NCAP
    lba_size: int
    lba_format: int
    controllers: list[int]
    block_device: str | None = None   # /dev/nvmeXnY on this host, when attached here

    @property
    def size_bytes(self) -> int:
        return self.blocks * self.lba_size

    def to_json(self) -> dict:
        return {**asdict(self), "size_bytes": self.size_bytes}


def lba_formats(idns: dict) -> list[LbaFormat]:
    return [LbaFormat(i, _num(f.get("ds", 0)), _num(f.get("ms", 0)), _num(f.get("rp", 0)))
            for i, f in enumerate(idns.get("lbafs") or [])]


def flbas_index(flbas: int) -> int:
    return (flbas & 0xF) | ((flbas >> 5) & 0x3) << 4


def flbas_value(index: int) -> int:
    return (index & 0xF) | (index >> 4) << 5


def allocated_nsids(ctrl: Controller) -> list[int]:
    info = controller_info(ctrl)
    args = ("list-ns", ctrl.dev, "--all") if info.ns_management else ("list-ns", ctrl.dev)
    return [_num(e["nsid"]) for e in ctrl.cli.json(*args).get("nsid_list", [])]


def attached_controllers(ctrl: Controller, nsid: int) -> list[int]:
    if not controller_info(ctrl).ns_management:
        return [controller_info(ctrl).cntlid]  # without Namespace Attachment: active = attached here
    d = ctrl.cli.json("list-ctrl", ctrl.dev, "-n", str(nsid))
    return [_num(e["ctrl_id"]) for e in d.get("ctrl_list", [])]


def namespace(ctrl: Controller, nsid: int) -> Namespace:
    info = controller_info(ctrl)
    args = ["id-ns", ctrl.dev, "-n", str(nsid)] + (["--force"] if info.ns_management else [])
    d = ctrl.cli.json(*args)
    fmts = lba_formats(d)
    idx = flbas_index(_num(d.get("flbas", 0)))
    lba = fmts[idx].lba_size if idx < len(fmts) else 0
    attached = attached_controllers(ctrl, nsid)
    dev = None
    if info.cntlid in attached:
        names = ctrl.sysfs.block_devices(info.subnqn, nsid)
        dev = f"/dev/{names[0]}" if names else None
    return Namespace(nsid, _num(d.get("nsze", 0)), _num(d.get("ncap", 0)), lba, idx, attached, dev)


def list_namespaces(ctrl: Controller) -> list[Namespace]:
    return [namespace(ctrl, n) for n in allocated_nsids(ctrl)]


def secondaries(ctrl: Controller) -> list[Secondary]:
    if not controller_info(ctrl).virtualization:
        return []
    try:
        return parse_secondaries(ctrl.cli.json("list-secondary", ctrl.dev))
    except CoresliceError:
        return []


def describe_controller(ctrl: Controller, cntlid: int, secs: Sequence[Secondary] | None = None) -> str:
    if cntlid == controller_info(ctrl).cntlid:
        return f"this host's {ctrl.name}"
    for s in secondaries(ctrl) if secs is None else secs:
        if s.scid == cntlid:
            return f"secondary controller of VF {s.vfn - 1}"
    return "another controller of the subsystem"


def _hexlist(ids: Iterable[int]) -> str:
    return ", ".join(f"0x{c:x}" for c in ids) or "none"


def _require_nsid(ctrl: Controller, nsid: int) -> None:
    nsids = allocated_nsids(ctrl)
    if nsid not in nsids:
        raise UsageError(f"namespace {nsid} does not exist on {ctrl.name} (namespaces: "
                         f"{', '.join(map(str, nsids)) or 'none'}); see: coreslice nvme ns list {ctrl.name}")


def _require_attachment(ctrl: Controller, what: str) -> ControllerInfo:
    info = controller_info(ctrl)
    if not info.ns_management:
        raise UsageError(f"controller {ctrl.name} has no namespace management (OACS bit 3 clear); "
                         f"it cannot {what} namespaces")
    return info


def _require_ns_management(ctrl: Controller, what: str) -> ControllerInfo:
    info = _require_attachment(ctrl, what)
    if info.ns_create is False:
        raise UsageError(f"controller {ctrl.name} attaches namespaces but has no Namespace Management command "
                         f"(opcode 0Dh is not in its Commands Supported and Effects log, as on QEMU); "
                         f"it cannot {what} namespaces")
    return info


def create(ctrl: Controller, size_bytes: int, lba_size: int = 4096) -> int:
    """Create a namespace of ``size_bytes`` (not attached anywhere) and return its NSID."""
    if lba_size not in LBA_SIZES:
        raise UsageError(f"LBA size {lba_size} is not supported here; give 512 or 4096")
    if size_bytes <= 0 or size_bytes % lba_size:
        raise UsageError(f"size {size_bytes} bytes is not a positive multiple of the LBA size {lba_size}; "
                         f"round it, e.g. to {max(1, -(-size_bytes // lba_size)) * lba_size}")
    info = _require_ns_management(ctrl, "create")
    nsids = allocated_nsids(ctrl)
    if info.nn and len(nsids) >= info.nn:
        raise UsageError(f"controller {ctrl.name} already has {len(nsids)} namespaces, its maximum (NN); "
                         f"delete one first: coreslice nvme ns delete {ctrl.name} NSID")
    if info.tnvmcap and size_bytes > info.unvmcap:  # TNVMCAP 0: capacity not reported
        raise UsageError(f"controller {ctrl.name} has {_gib(info.unvmcap)} unallocated of {_gib(info.tnvmcap)}, "
                         f"less than the {_gib(size_bytes)} asked for; ask for less or delete a namespace "
                         f"(coreslice nvme ns delete {ctrl.name} NSID)")
    fmts = lba_formats(ctrl.cli.json("id-ns", ctrl.dev, "-n", f"0x{NSID_ALL:x}"))
    fits = [f for f in fmts if f.lba_size == lba_size and f.ms == 0]
    if not fits:
        have = ", ".join(f"{f.lba_size}" + (f"+{f.ms}" if f.ms else "") for f in fmts) or "none reported"
        raise UsageError(f"controller {ctrl.name} has no LBA format of {lba_size}-byte blocks without metadata "
                         f"(formats: {have}); give --lba-size with one of those sizes")
    fmt = min(fits, key=lambda f: (f.rp, f.index))
    blocks = size_bytes // lba_size
    out = ctrl.cli.text("create-ns", ctrl.dev, f"--nsze={blocks}", f"--ncap={blocks}",
                        f"--flbas={flbas_value(fmt.index)}")
    m = re.search(r"created nsid:\s*(\d+)", out)
    if not m:
        raise CoresliceError(f"nvme create-ns on {ctrl.dev} printed no namespace ID ({' '.join(out.split())!r}); "
                             f"find it with: coreslice nvme ns list {ctrl.name}")
    return int(m.group(1))


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB ({n} bytes)"


def attach(ctrl: Controller, nsid: int, controllers: Sequence[int]) -> None:
    """Attach namespace ``nsid`` to the controllers (CNTLIDs) of this subsystem.  Refuses a
    namespace attached anywhere already: a slice owns its namespace alone."""
    if not controllers:
        raise UsageError("no controller to attach to; give --host, --vf INDEX or --controller CNTLID")
    _require_attachment(ctrl, "attach")
    _require_nsid(ctrl, nsid)
    known = [_num(e["ctrl_id"]) for e in ctrl.cli.json("list-ctrl", ctrl.dev).get("ctrl_list", [])]
    for c in controllers:
        if c not in known:
            raise UsageError(f"controller 0x{c:x} is not in {ctrl.name}'s subsystem (controllers: "
                             f"{_hexlist(known)}); see: nvme list-ctrl {ctrl.dev}")
    attached = attached_controllers(ctrl, nsid)
    if attached:
        c = attached[0]
        if c in controllers and len(attached) == 1:
            raise UsageError(f"namespace {nsid} is already attached to controller 0x{c:x} "
                             f"({describe_controller(ctrl, c)}); nothing to do")
        raise UsageError(f"namespace {nsid} is attached to controller 0x{c:x} ({describe_controller(ctrl, c)}); "
                         f"detach it first: coreslice nvme ns detach {ctrl.name} {nsid} --controller 0x{c:x}")
    ctrl.cli.text("attach-ns", ctrl.dev, "-n", str(nsid), "-c", ",".join(str(c) for c in controllers))


def detach(ctrl: Controller, nsid: int, controllers: Sequence[int] | None = None,
           all_attached: bool = False) -> list[int]:
    """Detach ``nsid`` from ``controllers`` (default: this host's controller; ``all_attached``: every
    controller it is attached to).  Returns the CNTLIDs detached."""
    info = _require_attachment(ctrl, "detach")
    _require_nsid(ctrl, nsid)
    attached = attached_controllers(ctrl, nsid)
    if all_attached:
        if not attached:
            raise UsageError(f"namespace {nsid} is not attached to any controller; nothing to detach")
        targets = list(attached)
    else:
        targets = list(controllers) if controllers else [info.cntlid]
        for c in targets:
            if c not in attached:  # QEMU 10 aborts on this (assertion in nvme_detach_ns)
                raise UsageError(f"namespace {nsid} is not attached to controller 0x{c:x} "
                                 f"({describe_controller(ctrl, c)}; attached to: {_hexlist(attached)}); "
                                 f"nothing to detach")
    if info.cntlid in targets:
        _refuse_mounted(ctrl, info, nsid)
    ctrl.cli.text("detach-ns", ctrl.dev, "-n", str(nsid), "-c", ",".join(str(c) for c in targets))
    return targets


def _refuse_mounted(ctrl: Controller, info: ControllerInfo, nsid: int) -> None:
    devs = [f"/dev/{b}" for b in ctrl.sysfs.block_devices(info.subnqn, nsid)]
    for source, target in ctrl.sysfs.mounts():
        if any(source == d or re.fullmatch(re.escape(d) + r"p\d+", source) for d in devs):
            raise UsageError(f"namespace {nsid} is mounted on this host ({source} on {target}); "
                             f"unmount it first: umount {target}")


def delete(ctrl: Controller, nsid: int) -> None:
    _require_ns_management(ctrl, "delete")
    _require_nsid(ctrl, nsid)
    attached = attached_controllers(ctrl, nsid)
    if attached:
        c = attached[0]
        raise UsageError(f"namespace {nsid} is attached to controller 0x{c:x} ({describe_controller(ctrl, c)}); "
                         f"detach it first: coreslice nvme ns detach {ctrl.name} {nsid} --all")
    out = ctrl.cli.text("delete-ns", ctrl.dev, "-n", str(nsid))
    if not re.search(rf"deleted nsid:\s*{nsid}\b", out):
        raise CoresliceError(f"nvme delete-ns on {ctrl.dev} did not confirm ({' '.join(out.split())!r}); "
                             f"check: coreslice nvme ns list {ctrl.name}")


def vf_secondary(ctrl: Controller, vf_index: int) -> Secondary:
    """The secondary controller of VF ``vf_index`` (0-based; its VFN is ``vf_index + 1``),
    checked to be enabled and online."""
    info = controller_info(ctrl)
    pf = info.pci
    if vf_index < 0:
        raise UsageError(f"VF index {vf_index} is negative; VFs count from 0")
    if not info.virtualization:
        raise UsageError(f"controller {ctrl.name} has no Virtualization Management (OACS bit 7 clear), so no "
                         "secondary controllers for VFs; give --host or --controller CNTLID")
    total = ctrl.sysfs.pci_attr(pf, "sriov_totalvfs") if pf else None
    if total is None:
        raise UsageError(f"controller {ctrl.name} ({pf or 'no PCI function'}) has no SR-IOV (no sriov_totalvfs); "
                         "give --host or --controller CNTLID")
    numvfs = int(ctrl.sysfs.pci_attr(pf, "sriov_numvfs") or 0)
    if numvfs == 0:
        raise UsageError(f"VFs not yet enabled on {pf} (sriov_numvfs is 0, up to {total}); enable them: "
                         f"coreslice sriov prepare --nvme-vf {pf}:{vf_index}, or echo {total} > "
                         f"/sys/bus/pci/devices/{pf}/sriov_numvfs")
    if vf_index >= numvfs:
        raise UsageError(f"VF {vf_index} is not enabled on {pf} (sriov_numvfs is {numvfs}: VFs 0-{numvfs - 1}); "
                         f"give a lower --vf or enable more VFs (up to {total})")
    secs = secondaries(ctrl)
    sec = next((s for s in secs if s.vfn == vf_index + 1), None)
    if sec is None:
        raise UsageError(f"{ctrl.name} lists no secondary controller for VF {vf_index} (VFN {vf_index + 1}); "
                         f"see: nvme list-secondary {ctrl.dev}")
    if not sec.online:
        raise UsageError(
            f"secondary controller 0x{sec.scid:x} of VF {vf_index} is offline; give it flexible queue and interrupt "
            f"resources and bring it online: nvme virt-mgmt {ctrl.dev} --cntlid={sec.scid} --rt=0 --act=8 --nr=Q, "
            f"then --rt=1 --act=8 --nr=I, then --act=9 (coreslice sriov prepare --nvme-vf {pf}:{vf_index} does "
            f"this; some controllers, e.g. PM1735, bring none online unless sriov_numvfs = sriov_totalvfs)")
    return sec


def attach_to_vf(ctrl: Controller, nsid: int, vf_index: int) -> int:
    """Attach ``nsid`` to VF ``vf_index``'s secondary controller; returns its CNTLID."""
    sec = vf_secondary(ctrl, vf_index)
    attach(ctrl, nsid, [sec.scid])
    return sec.scid


def attach_to_host(ctrl: Controller, nsid: int, deadline: float = 10.0, poll: float = 0.1) -> str:
    """Attach ``nsid`` to this host's controller, rescan, and wait up to ``deadline`` seconds for
    its block device (attachment takes effect asynchronously).  Returns ``/dev/nvmeXnY``."""
    info = controller_info(ctrl)
    attach(ctrl, nsid, [info.cntlid])
    ctrl.cli.text("ns-rescan", ctrl.dev)
    return wait_block_device(ctrl, nsid, deadline, poll)


def wait_block_device(ctrl: Controller, nsid: int, deadline: float = 10.0, poll: float = 0.1) -> str:
    info = controller_info(ctrl)
    end = time.monotonic() + deadline
    while True:
        names = ctrl.sysfs.block_devices(info.subnqn, nsid)
        if names:
            if ctrl.settle:
                ctrl.settle()
            elif ctrl.sysfs.root == Path("/"):  # udev's /dev nodes and links; not for a test tree
                udev_settle(max(1.0, end - time.monotonic()))
            return f"/dev/{names[0]}"
        if time.monotonic() >= end:
            raise CoresliceError(
                f"namespace {nsid} is attached to {ctrl.name} (controller 0x{info.cntlid:x}) but no block device "
                f"with nsid {nsid} in subsystem {info.subnqn} appeared under {ctrl.sysfs.sys / 'block'} within "
                f"{deadline:g}s; check dmesg, run nvme ns-rescan {ctrl.dev}, then coreslice nvme ns list {ctrl.name}")
        time.sleep(poll)
