"""One launch, as one transaction: resolve once, check everything, then act.

    request ─► discover ─► place ─► plan (every check; files opened and sized)
            ─► reserve (ledger) ─► act (VFs, detach, INIT, write, wake) ─► record

The plan is complete before the first effect: every refusal (bad input, a resource in use, a
file that cannot be read, a VF that cannot be had) is a UsageError raised before anything was
changed, the ledger file included (it is only read until the reservation).  Effects go through
the :class:`~coreslice.machine.Machine` the session was given; the act phase (acting.py) logs
what it changes and undoes it when a step before the INIT fails.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from coreslice.boot import efi, lowmem
from coreslice.boot.image import BootImage, build_image
from coreslice.errors import LaunchError, UsageError
from coreslice.host import consoles
from coreslice.host.snapshot import Host, discover
from coreslice.launch import acting, scrub
from coreslice.launch.vfprep import PreparedVf
from coreslice.ledger import Ledger, LedgerConflict, SliceRecord, resolve_path
from coreslice.machine import Machine, lapic
from coreslice.machine.physmem import PhysicalMemory
from coreslice.plan import vfs as vfplan
from coreslice.plan.boot import Plan, SlotReader, make_plan
from coreslice.plan.placement import Placement, Request, held_resources, place
from coreslice.request import BootRequest, BootSpec

Progress = Callable[[str], None]
PLACE_TRIES = 3  # a concurrent launch may take what placement chose: place again


@dataclass
class BootResult:
    plan: Plan
    image: BootImage
    phases: dict[str, float] = field(default_factory=dict)
    dry_run_dir: Path | None = None
    detached_driver: str | None = None
    detached_devices: dict[str, str | None] = field(default_factory=dict)  # --device -> old driver
    slice: SliceRecord | None = None     # the ledger row (None on dry runs and without a ledger)
    ledger_path: Path | None = None
    placement: Placement | None = None
    vfs: list = field(default_factory=list)  # PreparedVf (or planned ones on a dry run)
    wake: dict[str, float] = field(default_factory=dict)
    # A relaunch: the functions of the slice it replaces, quieted before the INIT (what was done)
    relaunch_quieted: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    dma: dict | None = None  # the slice's IOMMU domain (None: the host's IOMMU does not translate)
    dma_released: list[str] = field(default_factory=list)  # domains of the slices this one replaced

    def to_json(self) -> dict:
        return {
            "ok": True,
            "dry_run": self.dry_run_dir is not None,
            "dry_run_dir": str(self.dry_run_dir) if self.dry_run_dir else None,
            "plan": self.plan.to_json(),
            "segments": [s.to_json() for s in self.image.segments],
            "acpi_tables": self.image.acpi_tables,
            "bytes": self.image.total_bytes,
            "phases": {k: round(v, 6) for k, v in self.phases.items()},
            "console_detached_from": self.detached_driver,
            "devices_detached_from": self.detached_devices,
            "relaunch_quieted": self.relaunch_quieted,
            "warnings": self.warnings,
            "dma": self.dma,
            "dma_released": self.dma_released,
            "slice": self.slice.to_json() if self.slice else None,
            "ledger": str(self.ledger_path) if self.ledger_path else None,
            "placement": self.placement.to_json() if self.placement else None,
            "vfs": [v.to_json() for v in self.vfs],
            # Seconds from the first SIPI until the CPU ran the trampoline / jumped to the kernel.
            "wake": {k: round(v, 6) for k, v in self.wake.items()} or None,
            # ru_maxrss is in KiB on Linux: the loader's peak memory, reported for the benchmark.
            "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }


# -- low-memory slots ---------------------------------------------------------------------------

def slot_reader(mem: PhysicalMemory) -> SlotReader:
    def read(slot: int) -> lowmem.SlotRecord | None:
        return lowmem.SlotRecord.decode(mem.read(lowmem.record_address(slot), lowmem.RECORD_SIZE))
    return read


def slot_view(read: SlotReader, held: list[SliceRecord], boot_id: str) -> SlotReader:
    """The low-memory slots as make_plan should see them: the physical record when it is from
    this host boot, else the ledger's slice that reserved the slot (it may not have written its
    record yet: two launches must not pick the same free slot)."""
    by_slot = {r.low_slot: r for r in held if r.low_slot is not None}

    def view(slot: int) -> lowmem.SlotRecord | None:
        rec = read(slot)
        if rec is not None and rec.boot_id == boot_id:
            return rec
        r = by_slot.get(slot)
        if r is not None:
            return lowmem.SlotRecord(boot_id, tuple(r.apic_ids), r.mem_base, r.mem_size)
        return rec
    return view


def read_slot_records(host: Host, mem: PhysicalMemory) -> dict[int, lowmem.SlotRecord]:
    """Slot base -> record of a slice started since this host boot (the physical truth)."""
    read = slot_reader(mem)
    out = {}
    for slot in lowmem.SLOT_BASES:
        if any(r.contains(slot, slot + lowmem.SLOT_SIZE) for r in host.firmware_ram()):
            rec = read(slot)
            if rec is not None and rec.boot_id == host.boot_id:
                out[slot] = rec
    return out


def slot_records(host: Host, machine: Machine | None) -> list[lowmem.SlotRecord]:
    """This boot's low-memory slot records, or none when they cannot be read (not root)."""
    if machine is None or (host.live and os.geteuid() != 0):
        return []
    try:
        return list(read_slot_records(host, machine.mem).values())
    except (LaunchError, UsageError, OSError):
        return []


def slice_record(spec: BootSpec, plan: Plan) -> SliceRecord:
    """What the ledger keeps of a planned slice."""
    if plan.pci is not None:
        devices = tuple(d.address for d in plan.pci.devices)
    else:
        devices = tuple(consoles.normalize_pci_address(d) or d for d in spec.devices)
    return SliceRecord(
        name=spec.name or f"slice-{plan.cpus[0]}", cpus=tuple(plan.cpus), apic_ids=tuple(plan.apic_ids),
        mem_base=plan.mem_base, mem_size=plan.mem_size, low_slot=plan.slot,
        console=plan.console.pci_address or (f"io:0x{plan.console.port:x}" if plan.console.port is not None else None),
        devices=devices,
        kernel=str(spec.kernel), initrd=str(spec.initrd) if spec.initrd else None, cmdline=plan.cmdline,
        request=_with_tsc(spec.record_argv, plan.tsc_khz), on_crash=spec.on_crash,
        efi_status=plan.efi_addr + efi.STATUS_OFFSET if plan.efi_addr else None)


def _with_tsc(argv: tuple[str, ...] | None, tsc_khz: int) -> tuple[str, ...] | None:
    """The recorded request with the TSC frequency this launch used: a restart days later may
    no longer find the host's calibration line in its wrapped kernel log."""
    if argv is None or any(a == "--tsc-khz" or a.startswith("--tsc-khz=") for a in argv):
        return argv
    return (*argv, f"--tsc-khz={tsc_khz}")


# -- dry runs -----------------------------------------------------------------------------------

def check_dry_run_dir(directory: Path) -> None:
    """A dry run writes into a new or empty directory that can be created: refuse anything else
    before the plan is made (so that a refusal writes nothing there either)."""
    d = Path(directory)
    if d.exists() or d.is_symlink():
        if not d.is_dir():
            raise UsageError(f"--dry-run {d}: exists and is not a directory; give a new or empty directory")
        try:
            if any(d.iterdir()):
                raise UsageError(f"--dry-run {d}: not empty; give a new or empty directory")
        except OSError as e:
            raise UsageError(f"--dry-run {d}: cannot list it ({e.strerror}); give a directory you can write") from None
        if not os.access(d, os.W_OK | os.X_OK):
            raise UsageError(f"--dry-run {d}: not writable; give a directory you can write")
        return
    parent = d.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--dry-run {d}: cannot create it under {parent} (not a writable directory); "
                         "give a path you can write")
    if str(parent).startswith(("/proc", "/sys")):
        raise UsageError(f"--dry-run {d}: is under {parent}, a kernel file system; give a normal directory")


def write_dry_run(directory: Path, plan: Plan, image: BootImage) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, seg in enumerate(image.segments):
        with open(directory / f"{i:02d}-{seg.name}@0x{seg.addr:x}.bin", "wb") as f:
            for _, buf in seg.chunks():
                f.write(buf)
    (directory / "dsdt.asl").write_text(image.dsdt_asl)
    (directory / "plan.json").write_text(json.dumps(
        {"plan": plan.to_json(), "segments": [s.to_json() for s in image.segments],
         "acpi_tables": image.acpi_tables}, indent=2) + "\n")


# -- the session --------------------------------------------------------------------------------

def open_ledger(path: Path | None, host: Host, *, readonly: bool) -> Ledger:
    return Ledger(resolve_path(path), host.boot_id, readonly=readonly)


def boot_cpu_apic(host: Host, machine: Machine, mode: str) -> lapic.LocalApic:
    """The local APIC we send IPIs from: the boot CPU's, so pin this process there first (the
    ICR is per CPU; with maxcpus=1 it is the only online one anyway)."""
    if host.live and not machine.fake:
        try:
            os.sched_setaffinity(0, {c.cpu for c in host.cpus if c.boot})
        except OSError:
            pass
    return machine.apic(mode)


@dataclass
class Planned:
    spec: BootSpec
    plan: Plan
    image: BootImage
    placement: Placement | None
    vfs: list[vfplan.Checked]


class LaunchSession:
    """One ``coreslice boot``: see the module docstring."""

    def __init__(self, request: BootRequest, machine: Machine | None,
                 progress: Progress = lambda _m: None, host: Host | None = None):
        self.req = request
        self.machine = machine
        self.progress = progress
        self.host = host

    # -- plan (no effect) -------------------------------------------------------------------
    def plan(self, host: Host, ledger: Ledger) -> Planned:
        """Everything decided and checked; nothing changed."""
        req = self.req
        ops = self.machine.sriov if self.machine is not None else None
        if ops is None and req.vfs:
            from coreslice.machine.sriov import RealOps
            ops = RealOps(req.host_root)  # reads only: a dry run on a captured tree
        held = {f: r.name for r in ledger.holding() for f in r.pci_functions()}
        checked, view, pci_extra, prefix = plan_vfs(req, host, held, ops)
        placement = None
        if req.placed_by_us:
            held = held_resources(host, ledger.holding(), slot_records(host, self.machine))
            placement = place(host, Request(mem_size=req.mem_size, ncpus=req.ncpus, cpus=req.cpus,
                                            mem_base=req.mem_base, node=req.numa_node, name=req.name,
                                            low_apic_ids=bool(req.devices or req.vfs)), held)
        cpus = placement.cpus if placement else list(req.cpus or ())
        base = placement.mem_base if placement else req.mem_base
        spec = req.spec(cpus, base, devices=[c.vf for c in checked], cmdline_prefix=prefix, pci_extra=pci_extra)
        plan, image = plan_spec(spec, view, self.machine, ledger, relaunch=_is_relaunch(placement))
        return Planned(spec, plan, image, placement, checked)

    # -- the whole transaction --------------------------------------------------------------
    def run(self) -> BootResult:
        req, t0 = self.req, time.perf_counter()
        if req.dry_run is not None:
            check_dry_run_dir(req.dry_run)
        host = self.host or discover(req.host_root)
        ledger = open_ledger(req.ledger, host, readonly=True)  # read only until the reservation
        for attempt in range(1, PLACE_TRIES + 1):
            try:
                planned = self.plan(host, ledger)
            except LedgerConflict:  # a concurrent launch reserved between placing and checking
                if not req.placed_by_us or attempt == PLACE_TRIES:
                    raise
                self.progress("a concurrent launch took those resources; placing again")
                continue
            t1 = time.perf_counter()
            result = BootResult(planned.plan, planned.image, {"plan": t1 - t0}, placement=planned.placement)
            if req.dry_run is not None:
                result.vfs = [PreparedVf(c.req.kind, c.req.pf, c.req.index, c.vf) for c in planned.vfs]  # type: ignore[arg-type]
                write_dry_run(req.dry_run, planned.plan, planned.image)
                result.dry_run_dir = req.dry_run
                result.phases["dry_run_write"] = time.perf_counter() - t1
                return result
            if self.machine is None:
                raise UsageError("--host-root describes another machine, which boot cannot act on; "
                                 "add --dry-run DIR to plan for it")
            try:
                return self._launch(planned, host, result, t0)
            except LedgerConflict:
                if not req.placed_by_us or attempt == PLACE_TRIES:
                    raise
                self.progress("a concurrent launch took those resources; placing again")
        raise AssertionError("unreachable")

    def _launch(self, planned: Planned, host: Host, result: BootResult, t0: float) -> BootResult:
        assert self.machine is not None
        relaunch = _is_relaunch(planned.placement)
        ledger = open_ledger(self.req.ledger, host, readonly=False)
        return reserve_and_act(planned.spec, planned.plan, planned.image, planned.vfs, host, self.machine,
                               ledger, self.progress, result, t0, relaunch=relaunch)


def _is_relaunch(placement: Placement | None) -> bool:
    # Resources placement chose as free are a relaunch only when placement said so (--name).
    return placement is None or placement.relaunch is not None


def reserve_and_act(spec: BootSpec, plan: Plan, image: BootImage, vfs: list[vfplan.Checked], host: Host,
                    machine: Machine, ledger: Ledger | None, progress: Progress, result: BootResult,
                    t0: float, *, relaunch: bool = True) -> BootResult:
    """Reserve in the ledger, then act.  A failure before the INIT undoes every change and
    releases the reservation (LaunchError says what was undone); a failure from the INIT on
    leaves the slice ``failed``, holding its resources."""
    # A group shared with the host was refused by the plan (plan/pci.py); the domain is built below.
    confine = dma_functions(plan, machine)
    # Reserve first, in one transaction with the conflict check (ledger.py): of two launches
    # that want the same resources, the second is refused here, before touching anything.
    row = None
    if ledger is not None:
        row = ledger.reserve(slice_record(spec, plan), relaunch=relaunch)
        result.slice, result.ledger_path = row, ledger.path
        progress(f"reserved slice '{row.name}' in the ledger {ledger.path}")
    pause_for_tests("reserved")
    undo, acted = acting.UndoLog(), acting.Acted()

    def phase(name: str) -> None:
        if row is not None:
            ledger.set_phase(row.id, name)  # type: ignore[union-attr,arg-type]
        pause_for_tests(name)

    replaced = [r for rid in (row.replaces if row is not None else ()) if (r := ledger.get(rid)) is not None]  # type: ignore[union-attr]
    name = row.name if row is not None else slice_record(spec, plan).name
    try:
        # What can still fail without a trace (the msr device) comes first.
        apic = boot_cpu_apic(host, machine, plan.apic_mode)
        phase("devices")
        if machine.dma is not None:
            # A slice being replaced lets go of its DMA domain first: its functions are bound to
            # vfio-pci by its holder, and unbinding them while it holds them would block.  Its
            # devices' DMA faults from here on, which is safe; they are quieted below.
            for r in replaced:
                done = machine.dma.release(r.name)  # type: ignore[attr-defined]
                if done:
                    progress(f"{r.name}: {done}")
                    result.dma_released.append(f"{r.name}: {done}")
        acting.prepare_devices(plan, vfs, machine, progress, acted, undo)
        if confine:
            result.dma = confine_dma(name, confine, plan, machine, progress, undo)
    except BaseException as e:
        what = undo.undo()
        if row is not None:
            ledger.release(row.id)  # type: ignore[union-attr,arg-type]
            result.slice = None
        if result.dma_released:  # not undoable: the replaced slice's devices now fault on every DMA
            what += (f"; the DMA domain of the slice this launch replaces had been ended ({'; '.join(result.dma_released)}): "
                     "its devices' DMA faults until it is restarted")
        if isinstance(e, (UsageError, LaunchError)) and what != "nothing had been changed":
            raise LaunchError(f"{e}; {what}") from e
        raise
    _fill_detached(result, plan, acted)
    if row is not None:
        ledger.begin_launch(row.id)  # type: ignore[union-attr,arg-type]
    spans = scrub.ranges(plan.mem_base, plan.mem_size, plan.slot)
    # A relaunch onto a slice that still holds the resources (it crashed, or was never stopped):
    # its functions go quiet first, as `stop` does, and bus mastering off again once its CPUs
    # have the INIT, so no DMA of the old slice lands in the scrubbed range or the new image.
    from coreslice.launch import stopping  # it imports this module

    old_fns = sorted({fn for r in replaced for fn in r.pci_functions()})
    quieted = result.relaunch_quieted
    if old_fns:
        stopping.quiesce(old_fns, host, machine, quieted, result.warnings, progress)

    def scrub_after_init(p: Progress) -> float:
        stopping.quiesce_again(machine, quieted, result.warnings)
        return scrub.scrub(machine.mem, spans, p)
    try:
        acting.start(plan, image, machine, apic, progress, acted, phase=phase,
                     scrub=scrub_after_init, wake_timeout=spec.wake_timeout)
    except BaseException as e:  # its CPUs may run: it stays held until reboot, relaunch or stop
        if row is not None:
            ledger.finish(row.id, error=str(e) or type(e).__name__)  # type: ignore[union-attr,arg-type]
        raise
    if row is not None:
        ledger.finish(row.id)  # type: ignore[union-attr,arg-type]
        result.slice = ledger.get(row.id)  # type: ignore[union-attr,arg-type]
    result.vfs = acted.vfs
    result.wake = acted.wake
    result.phases.update(acted.phases)
    result.phases["total"] = time.perf_counter() - t0
    return result


def dma_functions(plan: Plan, machine: Machine) -> list[str]:
    """The functions whose DMA the host's IOMMU must confine to the slice's RAM: all of them when
    the host's IOMMU translates (host configure --iommu on), none otherwise."""
    fns = [f.address for f in plan.pci.functions] if plan.pci else []
    if not fns or machine.dma is None or not machine.dma.translates():  # type: ignore[attr-defined]
        return []
    return fns


def confine_dma(name: str, fns: list[str], plan: Plan, machine: Machine, progress: Progress,
                undo: acting.UndoLog) -> dict:
    """The slice's IOMMU domain (launch/dmahold.py), before its CPUs get the INIT: undoable."""
    from coreslice.launch.dmahold import Range

    dma = machine.dma
    groups = dma.check(fns)  # type: ignore[attr-defined]  # now with the VFs that exist since prepare
    state = dma.hold(name, fns, [Range(plan.mem_base, plan.mem_size)], progress)  # type: ignore[attr-defined]
    undo.add(f"the DMA domain of {', '.join(fns)}", lambda: dma.release(name))  # type: ignore[attr-defined]
    return {"confined": True, "functions": fns, "iommu_groups": groups,
            "iova": {"base": plan.mem_base, "size": plan.mem_size}, "holder_pid": state.get("pid"),
            "notes": state.get("notes", [])}


# Fault injection for the crash-consistency tests (tests/unit/launch/test_lifecycle.py and the
# emulated machine's): the launch stops at the start of phase $CORESLICE_TEST_PAUSE_AT, writes its
# pid to $CORESLICE_TEST_PAUSE_FILE and waits to be killed.  Unset, it costs one dict lookup.
PAUSE_ENV, PAUSE_FILE_ENV = "CORESLICE_TEST_PAUSE_AT", "CORESLICE_TEST_PAUSE_FILE"


def pause_for_tests(phase: str) -> None:
    if os.environ.get(PAUSE_ENV) != phase:
        return
    # Written aside and renamed: a test that polls for the file must never read it half-written.
    path = Path(os.environ[PAUSE_FILE_ENV])
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(f"{os.getpid()} {phase}\n")
    os.replace(tmp, path)
    while True:
        time.sleep(3600)


def _fill_detached(result: BootResult, plan: Plan, acted: acting.Acted) -> None:
    for address, driver in acted.detached.items():
        if plan.console.pci_address == address:
            result.detached_driver = driver
        else:
            result.detached_devices[address] = driver
    for v in acted.vfs:
        result.detached_devices[v.address] = v.unbound_from


def plan_vfs(req: BootRequest, host: Host, held: dict[str, str], ops) -> tuple[list[vfplan.Checked], Host, str, str]:
    """The VF part of the plan, no change: (checked requests with their VFs' addresses, the host
    as it will be with those VFs, the ``pci=`` addition and the command-line prefix for the
    slice kernel).  ``held``: PCI function -> the slice holding it."""
    check_guest_kernel(req.guest_kernel, req.vfs, req.devices, host)
    if not req.vfs:
        return [], host, "", ""
    checked = vfplan.check(req.vfs, ops, req.config.sriov, held)
    planned = [PreparedVf(c.req.kind, c.req.pf, c.req.index, c.vf) for c in checked]  # type: ignore[arg-type]
    console = [req.console] if consoles.normalize_pci_address(req.console) else []
    permit, vf_params = vfplan.slice_kernel_params(planned, [*req.devices, *console])
    return checked, vfplan.host_with_vfs(host, checked), f",permit_probe_only={permit}" if permit else "", vf_params


def check_guest_kernel(guest_kernel: str, reqs, devices, host: Host) -> None:
    """A stock kernel gets whole functions only (never a VF, given as --*-vf or as --device)."""
    if guest_kernel != "stock":
        return
    from coreslice.plan.pci import normalize

    if reqs:
        raise UsageError(f"{reqs[0].flag} with --guest-kernel stock: {vfplan.STOCK_VF_REFUSAL}")
    for d in devices:
        fn = host.pci.function(normalize(d))
        if fn is not None and fn.physfn:
            raise UsageError(f"--device {fn.address} is an SR-IOV VF of {fn.physfn}; {vfplan.STOCK_VF_REFUSAL}")


def plan_spec(spec: BootSpec, host: Host, machine: Machine | None, ledger: Ledger | None,
              *, relaunch: bool = True) -> tuple[Plan, BootImage]:
    """A decided spec against the host: the ledger's conflicts, every plan check, the image.
    ``relaunch=False``: the resources were placed as free, so a slice holding them is a conflict
    (reserve()'s rule), never a relaunch."""
    held = ledger.holding() if ledger else []
    if ledger is not None:  # CPUs, memory or name of a recorded slice: refuse now, naming it
        by_num = {c.cpu: c.apic_id for c in host.cpus}
        ledger.check(SliceRecord(
            name=spec.name or f"slice-{spec.cpus[0] if spec.cpus else '?'}", cpus=tuple(spec.cpus),
            apic_ids=tuple(a for a in (by_num.get(c) for c in spec.cpus) if a is not None),
            mem_base=spec.mem_base, mem_size=spec.mem_size), relaunch=relaunch)
    read = slot_reader(machine.mem) if machine is not None and not (host.live and os.geteuid() != 0) \
        else (lambda _slot: None)
    plan = make_plan(spec, host, slot_view(read, held, host.boot_id))
    return plan, build_image(plan)


def boot(spec: BootSpec, *, host: Host, machine: Machine, dry_run: Path | None = None,
         progress: Progress = lambda _m: None, ledger: Ledger | None = None) -> BootResult:
    """Plan and launch a spec whose CPUs and memory are decided (no VFs, no placement): the
    session's plan and act phases for callers that already hold a host and a machine (tests)."""
    t0 = time.perf_counter()
    plan, image = plan_spec(spec, host, machine, ledger)
    result = BootResult(plan, image, {"plan": time.perf_counter() - t0})
    if dry_run is not None:
        write_dry_run(dry_run, plan, image)
        result.dry_run_dir = dry_run
        return result
    return reserve_and_act(spec, plan, image, [], host, machine, ledger, progress, result, t0)


def stop(name: str, **kw):
    """`coreslice stop` (launch/stopping.py)."""
    from coreslice.launch.stopping import stop as _stop

    return _stop(name, **kw)


def stderr_progress(msg: str) -> None:
    print(f"coreslice: {msg}", file=sys.stderr, flush=True)
