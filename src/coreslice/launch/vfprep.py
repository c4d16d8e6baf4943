"""Preparing SR-IOV VFs on the host (the effects), with an undo log.

Only checked requests (plan/vfs.py) come here; every change is logged with how to undo it, and
a failure undoes them all, newest first, and says so.  Each undo is a :class:`Call` of one
:class:`SriovOps` method, plain data, so that a command whose undo comes later in another process
(``coreslice native-setup --undo``) can write the log to a file and replay it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from coreslice.errors import LaunchError
from coreslice.machine.sriov import ACT_ASSIGN, ACT_OFFLINE, ACT_ONLINE, RT_VI, RT_VQ, SriovOps
from coreslice.plan.vfs import Checked


# ---------------------------------------------------------------------------------------------
# Prepare and undo

@dataclass(frozen=True)
class Call:
    """``ops.<op>(*args)``: one undo step, callable now and storable as JSON."""
    ops: SriovOps = field(compare=False, repr=False)
    op: str
    args: tuple

    def __call__(self) -> None:
        getattr(self.ops, self.op)(*self.args)

    def to_json(self) -> dict:
        return {"op": self.op, "args": list(self.args)}


# The SriovOps methods an undo step may call (what prepare and native-setup log, nothing more).
UNDO_OPS = frozenset({"write_attr", "virt_mgmt", "set_vf_mac", "bind", "unbind", "del_address", "set_up"})


def call_from_json(ops: SriovOps, d: dict) -> Call:
    """A stored :meth:`Call.to_json` back; refuses a method that is no undo step."""
    op, args = d.get("op"), d.get("args")
    if op not in UNDO_OPS or not callable(getattr(ops, op, None)) or not isinstance(args, list):
        raise LaunchError(f"undo step {d!r} is not a call coreslice writes; the undo file is damaged")
    return Call(ops, op, tuple(args))


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
        return undo_all(self.undo_log)


def undo_all(log: list[tuple[str, Callable[[], None]]]) -> list[str]:
    """Run the undo steps of ``log`` newest first, emptying it; what could not be undone."""
    failed = []
    while log:
        what, fn = log.pop()
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
        prep.undo_log.append((f"sriov_drivers_autoprobe of {pf}",
                              Call(ops, "write_attr", (pf, "sriov_drivers_autoprobe", old or "1"))))
    progress(f"enabling {c.total} VFs of {pf}")
    ops.write_attr(pf, "sriov_numvfs", str(c.total))
    prep.undo_log.append((f"VFs of {pf}", Call(ops, "write_attr", (pf, "sriov_numvfs", "0"))))
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
                                  Call(ops, "virt_mgmt", (dev, s.scid, rt, ACT_ASSIGN, have))))
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
            prep.undo_log.append((f"secondary {s.scid} online", Call(ops, "virt_mgmt", (dev, s.scid, RT_VQ, ACT_OFFLINE, 0))))
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
    if c.vf and vf != c.vf:  # the plan (DSDT, command line) was made for the derived address
        raise LaunchError(f"{r.flag}: VF {r.index} of {r.pf} appeared at {vf}, not at {c.vf} as its SR-IOV "
                          "First VF Offset and Stride said; report this (sysfs sriov_offset/sriov_stride)")
    out.address = vf
    if r.kind == "nic":
        assert c.ifname and c.mac
        old = ops.vf_mac(c.ifname, r.index)
        progress(f"{c.ifname}: VF {r.index} MAC {c.mac}")
        ops.set_vf_mac(c.ifname, r.index, c.mac)
        if old and old != c.mac:
            prep.undo_log.append((f"MAC of VF {r.index} on {c.ifname}", Call(ops, "set_vf_mac", (c.ifname, r.index, old))))
        out.mac = c.mac
        prep.done.append(f"VF {r.index} of {c.ifname} has MAC {c.mac}")
    drv = ops.driver(vf)
    if drv is not None:
        progress(f"unbinding VF {vf} from {drv}")
        ops.unbind(vf)
        prep.undo_log.append((f"driver {drv} of {vf}", Call(ops, "bind", (vf, drv))))
        out.unbound_from = drv
        prep.done.append(f"unbound {vf} from {drv}")
    return out


def prepare(checked: Sequence[Checked], ops: SriovOps, progress: Callable[[str], None] = lambda _m: None) -> Preparation:
    """Make the changes; on any failure undo them all and raise LaunchError saying so (on Ctrl-C
    undo them too, and let the interrupt go on)."""
    prep = Preparation()
    try:
        for c in checked:
            prep.vfs.append(_prepare_one(ops, c, prep, progress))
    except Exception as e:
        raise LaunchError(f"{e}; {undo_message(prep)}") from e
    except BaseException:
        progress(f"interrupted: {undo_message(prep)}")
        raise
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


