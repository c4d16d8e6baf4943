"""``coreslice image install --nvme-vf PF:INDEX``: the prototype's mkns.sh + mkimage.sh in one step.

1. check everything: the image inputs (build.check), the PF's controller, the VF's secondary
   controller (enabled, online), the namespace (a new one of --size: namespace management and
   free capacity; or --nsid N: allocated and attached to no controller);
2. create the namespace (--size), attach it to this host's controller and wait for its block
   device;
3. build the image onto it (build.py);
4. detach it from the host and attach it to the VF's secondary controller;
5. record namespace -> VF in the ledger.

Each completed step registers its undo; a failure runs them backwards (the VF attachment and
the host attachment are removed, a namespace this command created is deleted), so a failed
install leaves the controller as it found it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from coreslice.errors import CoresliceError, UsageError
from coreslice.image import build as buildmod
from coreslice.nvme import ops

Progress = Callable[[str], None]


@dataclass
class InstallRequest:
    pf: str  # the PF's controller: PCI address, nvmeN or /dev/nvmeN
    vf_index: int
    build: buildmod.BuildRequest  # its target is filled in with the namespace's block device
    size: int | None = None  # create a namespace of this size ...
    nsid: int | None = None  # ... or use this allocated, unattached one
    lba_size: int = 4096
    ledger: Path | None = None
    wait: float = 10.0


@dataclass
class _Undo:
    steps: list[tuple[str, Callable[[], None]]] = field(default_factory=list)

    def add(self, what: str, fn: Callable[[], None]) -> None:
        self.steps.append((what, fn))

    def run(self) -> list[str]:
        done = []
        for what, fn in reversed(self.steps):
            try:
                fn()
                done.append(what)
            except Exception as e:  # keep undoing the rest; say what could not be undone
                done.append(f"could not {what} ({e})")
        return done


def parse_vf(text: str) -> tuple[str, int]:
    m = re.fullmatch(r"(.+):(\d+)", text.strip())
    if not m:
        raise UsageError(f"--nvme-vf {text!r}: write PF:INDEX, e.g. 0000:8d:00.0:1 or nvme0:1")
    return m.group(1), int(m.group(2))


def install(req: InstallRequest, progress: Progress = lambda m: None, ctrl: ops.Controller | None = None) -> dict:
    t0 = time.perf_counter()
    if (req.size is None) == (req.nsid is None):
        raise UsageError("give the namespace with exactly one of --size SIZE (create one) and --nsid N (use one)")
    ctrl = ctrl or ops.open_controller(req.pf)
    info = ops.controller_info(ctrl)
    sec = ops.vf_secondary(ctrl, req.vf_index)  # enabled and online, before anything changes
    if req.nsid is not None:
        ns = ops.namespace(ctrl, req.nsid)  # refuses an unknown nsid
        if ns.controllers:
            raise UsageError(f"namespace {req.nsid} is attached to controller(s) "
                             f"{', '.join(f'0x{c:x}' for c in ns.controllers)}; detach it first: coreslice nvme ns "
                             f"detach {ctrl.name} {req.nsid} --all")
        need = ns.size_bytes
    else:
        need = req.size
    # The image's own inputs (cloud-config, keys, tarball, ...): checked with a stand-in target
    # path, since the block device exists only after the attach.
    b = req.build
    checked = buildmod.check(b, with_target=False)
    # The tree's size against the namespace's, before anything is created or attached.
    tarball, _ = buildmod.obtain_tarball(checked, progress, {})
    from coreslice.image import rootfs
    tree = buildmod.needed_bytes(rootfs.scan_tarball(tarball))
    if need is not None and need < tree:
        raise UsageError(f"the image needs {-(-tree >> 20)} MiB but the namespace would have {need >> 20} MiB; "
                         "give a larger --size or another --nsid")
    ledger = _ledger(req.ledger)
    undo = _Undo()
    created = False
    try:
        if req.size is not None:
            progress(f"creating a {req.size >> 20} MiB namespace on {ctrl.name}")
            nsid = ops.create(ctrl, req.size, req.lba_size)
            created = True
            undo.add(f"delete namespace {nsid}", lambda: ops.delete(ctrl, nsid))
        else:
            nsid = req.nsid  # type: ignore[assignment]
        progress(f"attaching namespace {nsid} to this host's controller 0x{info.cntlid:x}")
        ops.attach(ctrl, nsid, [info.cntlid])
        # Registered before the rescan and the wait: a block device that never appears must
        # still leave the namespace detached (and deletable).
        undo.add(f"detach namespace {nsid} from the host", lambda: ops.detach(ctrl, nsid, [info.cntlid]))
        ctrl.cli.text("ns-rescan", ctrl.dev)
        dev = ops.wait_block_device(ctrl, nsid, req.wait)
        progress(f"namespace {nsid} is {dev}; building the image on it")
        b.target = Path(dev)
        result = buildmod.build(b, progress)
        progress(f"detaching namespace {nsid} from the host")
        ops.detach(ctrl, nsid, [info.cntlid])
        undo.steps.pop()  # detached: nothing left to undo for the host attachment
        progress(f"attaching namespace {nsid} to VF {req.vf_index} (secondary controller 0x{sec.scid:x})")
        ops.attach(ctrl, nsid, [sec.scid])
        undo.add(f"detach namespace {nsid} from VF {req.vf_index}", lambda: ops.detach(ctrl, nsid, [sec.scid]))
        ledger.record_namespace(pf=info.pci or ctrl.name, subsysnqn=info.subnqn, nsid=nsid, vf_index=req.vf_index,
                                cntlid=sec.scid, created=created, image=str(b.out_dir))
    except BaseException as e:
        what = undo.run()
        if created or "result" in locals():  # the disk is gone or undone: so is the image
            what += buildmod.forget_image(b.out_dir)
        if isinstance(e, CoresliceError):
            raise type(e)(f"{e}; undone: {', '.join(what) or 'nothing had been changed'}") from e
        raise
    return {"pf": info.pci, "controller": ctrl.name, "nsid": nsid, "created": created, "bytes": need,
            "vf_index": req.vf_index, "secondary_controller": sec.scid, "host_block_device": dev,
            "image": result, "ledger": str(ledger.path), "seconds": round(time.perf_counter() - t0, 3)}


def _ledger(path: Path | None):
    from coreslice.ledger import Ledger, resolve_path
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return Ledger(resolve_path(path), boot_id)
