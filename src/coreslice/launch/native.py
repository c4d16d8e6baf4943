"""``coreslice native-setup``'s changes, and their undo kept in a file for ``--undo``.

The VFs are prepared exactly as a slice's are (launch/vfprep.py: enabled with driver autoprobe
off, the NIC VF's MAC set, the NVMe VF's secondary controller online), then each VF is given to
the host's own driver (drivers_probe), and the NIC VF's interface gets the slice's address and
is set up.  Every change is logged as a replayable call (vfprep.Call); the log is written to
STATE_DIR/NAME.json, which ``--undo`` replays newest first.  A failure, or Ctrl-C, undoes what
was done before it, so the host is left as it was.

STATE_DIR is under /run: VFs, MACs and addresses end with the host boot, and so does the file
(it also records the boot id, so a stale file from another boot is recognised).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from coreslice.errors import LaunchError, UsageError
from coreslice.launch import vfprep
from coreslice.launch.vfprep import Call, call_from_json
from coreslice.machine.sriov import SriovOps
from coreslice.plan.vfs import Checked

STATE_DIR = Path("/run/coreslice/native")
Progress = Callable[[str], None]

# Drivers for the VFs of common SR-IOV NICs, named when none bound (a hint, not a rule).
NIC_VF_DRIVERS = "iavf, ixgbevf, igbvf, mlx5_core, bnxt_en"


@dataclass
class NativeVf:
    kind: str
    pf: str
    index: int
    address: str                    # the VF's PCI address
    driver: str | None = None
    mac: str | None = None
    ifname: str | None = None       # NIC: the host's interface for the VF
    ip: str | None = None           # NIC: the address given to it
    namespaces: list[int] = field(default_factory=list)      # NVMe: recorded for this VF
    block_devices: list[str] = field(default_factory=list)   # NVMe: what the host sees

    def to_json(self) -> dict:
        return dict(vars(self))


@dataclass
class NativeState:
    """What one native-setup did: written to STATE_DIR/NAME.json, replayed by --undo."""
    name: str
    boot_id: str
    vfs: list[NativeVf]
    undo: list[dict]                # [{"what", "op", "args"}], oldest first
    created_at: float

    def to_json(self) -> dict:
        return {"name": self.name, "boot_id": self.boot_id, "vfs": [v.to_json() for v in self.vfs],
                "undo": self.undo, "created_at": self.created_at}


def state_path(name: str, state_dir: Path = STATE_DIR) -> Path:
    return state_dir / f"{name}.json"


def load_state(path: Path) -> NativeState:
    try:
        d = json.loads(path.read_text())
        return NativeState(name=d["name"], boot_id=d["boot_id"], vfs=[NativeVf(**v) for v in d["vfs"]],
                           undo=list(d["undo"]), created_at=d["created_at"])
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path} is not a native-setup record ({e}); undo its changes by hand, then remove it") from None


def save_state(state: NativeState, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n")
    os.replace(tmp, path)


def held_vfs(state_dir: Path = STATE_DIR) -> dict[str, str]:
    """VF address -> the slice name of every native-setup record in ``state_dir``."""
    out: dict[str, str] = {}
    for p in sorted(state_dir.glob("*.json")) if state_dir.is_dir() else []:
        try:
            st = load_state(p)
        except (UsageError, FileNotFoundError):
            continue
        out.update({v.address: f"{st.name} (native-setup)" for v in st.vfs})
    return out


def _wait(what: Callable[[], object], timeout: float, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got or time.monotonic() >= deadline:
            return got
        time.sleep(poll)


def _probe_vf(ops: SriovOps, v: vfprep.PreparedVf) -> None:
    """drivers_probe with the PF's sriov_drivers_autoprobe briefly 1: the kernel probes a VF only
    when its PF allows autoprobe or the VF has a driver_override (drivers/pci/pci-driver.c,
    pci_device_can_probe), and vfprep turned it off so that no VF of a slice gets a host driver.
    Its own matching then picks the driver among those loaded."""
    old = ops.attr(v.pf, "sriov_drivers_autoprobe")
    if old != "0":
        ops.probe(v.address)
        return
    ops.write_attr(v.pf, "sriov_drivers_autoprobe", "1")
    try:
        ops.probe(v.address)
    finally:
        ops.write_attr(v.pf, "sriov_drivers_autoprobe", old)


def _give_to_host(ops: SriovOps, v: vfprep.PreparedVf, log: list, *, ip: str | None, nsids: Sequence[int],
                  progress: Progress, wait: float, settle: Callable[[], None]) -> NativeVf:
    out = NativeVf(v.kind, v.pf, v.index, v.address, mac=v.mac, namespaces=list(nsids))
    if ops.driver(v.address) is None:
        progress(f"binding {v.kind} VF {v.address} to its host driver (drivers_probe)")
        _probe_vf(ops, v)
        drv = ops.driver(v.address)
        if drv is None:
            hint = NIC_VF_DRIVERS if v.kind == "nic" else "nvme"
            raise LaunchError(f"no host driver took {v.kind} VF {v.address} (VF {v.index} of {v.pf}); load its "
                              f"driver (modprobe one of: {hint}) and run native-setup again")
        log.append((f"host driver {drv} of {v.address}", Call(ops, "unbind", (v.address,))))
    out.driver = ops.driver(v.address)
    settle()  # udev may rename the new interface; take the name it ends with
    if v.kind == "nic":
        ifname = _wait(lambda: ops.netdev(v.address), wait)
        if not ifname:
            raise LaunchError(f"{out.driver} bound {v.address} but no network interface appeared in {wait:g} s; "
                              f"see dmesg for {out.driver}")
        out.ifname = str(ifname)
        if ip is not None and ip not in ops.addresses(out.ifname):
            progress(f"{out.ifname}: address {ip}")
            ops.add_address(out.ifname, ip)
            log.append((f"address {ip} of {out.ifname}", Call(ops, "del_address", (out.ifname, ip))))
        out.ip = ip
        if not ops.is_up(out.ifname):
            progress(f"{out.ifname}: link up")
            ops.set_up(out.ifname, True)
            log.append((f"link of {out.ifname} up", Call(ops, "set_up", (out.ifname, False))))
    elif nsids:
        devs = _wait(lambda: len(ops.block_devices(v.address)) >= len(nsids) and ops.block_devices(v.address), wait)
        if not devs:
            raise LaunchError(f"VF {v.address}'s controller shows {len(ops.block_devices(v.address))} of the "
                              f"{len(nsids)} namespaces recorded for it (nsid {', '.join(map(str, nsids))}) after "
                              f"{wait:g} s; see nvme list-ctrl on {v.pf}'s controller, or reinstall the image "
                              "(coreslice image install)")
        out.block_devices = list(devs)
    else:
        out.block_devices = ops.block_devices(v.address)
    return out


def setup(name: str, boot_id: str, checked: Sequence[Checked], ops: SriovOps, *, ip: str | None,
          namespaces: dict[tuple[str, int], list[int]], progress: Progress = lambda _m: None, wait: float = 10.0,
          settle: Callable[[], None] = lambda: None) -> NativeState:
    """Prepare ``checked`` VFs and give them to the host; on any failure (Ctrl-C included) undo
    everything and raise LaunchError saying so."""
    prep = vfprep.prepare(checked, ops, progress)  # undoes itself if it fails
    out: list[NativeVf] = []
    try:
        for v in prep.vfs:
            out.append(_give_to_host(ops, v, prep.undo_log, ip=ip if v.kind == "nic" else None,
                                     nsids=namespaces.get((v.pf, v.index), []), progress=progress, wait=wait,
                                     settle=settle))
    except BaseException as e:
        msg = vfprep.undo_message(prep)
        if isinstance(e, Exception):
            raise LaunchError(f"{e}; {msg}") from e
        progress(f"interrupted: {msg}")
        raise
    steps = []
    for what, fn in prep.undo_log:
        assert isinstance(fn, Call), what  # every step must be replayable from the file
        steps.append({"what": what, **fn.to_json()})
    return NativeState(name=name, boot_id=boot_id, vfs=out, undo=steps, created_at=time.time())


def undo(state: NativeState, ops: SriovOps, progress: Progress = lambda _m: None) -> tuple[list[str], list[dict]]:
    """Replay the record's undo steps newest first, stopping at the first that fails (the older
    ones act on what it should have removed: an interface, a VF): (what was undone, the steps
    left, oldest first, the failed one last with its error)."""
    done = []
    steps = list(state.undo)
    while steps:
        step = steps[-1]
        try:
            progress(f"undo: {step.get('what')}")
            call_from_json(ops, step)()
        except Exception as e:
            steps[-1] = {**step, "error": str(e)}
            return done, steps
        done.append(str(step.get("what")))
        steps.pop()
    return done, []
