"""Boot orchestration: discover -> plan -> image -> (dry-run files | write + wake).

This is the only module that drives the machine interfaces.  Everything that can be refused is
refused in make_plan(), before the first write.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from coreslice.boot import lowmem
from coreslice.errors import LaunchError, UsageError
from coreslice.host import consoles
from coreslice.host.snapshot import Host, discover
from coreslice.boot.image import BootImage, build_image
from coreslice.ledger import Ledger, SliceRecord
from coreslice.machine import lapic
from coreslice.machine.pci import PciControl, SysfsPci
from coreslice.machine.physmem import DevMem, PhysicalMemory
from coreslice.plan.boot import Plan, SlotReader, make_plan
from coreslice.request import BootSpec


@dataclass
class Machine:
    """The effectful interfaces, real by default, fakes in tests."""

    mem: PhysicalMemory
    pci: PciControl
    apic: Callable[[str], lapic.LocalApic]
    sleep: Callable[[float], None] = time.sleep

    @classmethod
    def real(cls) -> "Machine":
        mem = DevMem()

        def make_apic(mode: str) -> lapic.LocalApic:
            if mode == "x2apic":
                return lapic.X2Apic(lapic.ensure_msr_device(0))
            return lapic.XApic(DevMem(uncached=True))

        return cls(mem=mem, pci=SysfsPci(), apic=make_apic)


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
            "slice": self.slice.to_json() if self.slice else None,
            "ledger": str(self.ledger_path) if self.ledger_path else None,
            # ru_maxrss is in KiB on Linux: the loader's peak memory, reported for the benchmark.
            "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }


def slot_reader(mem: PhysicalMemory):
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


def slice_record(spec: BootSpec, plan: Plan) -> SliceRecord:
    """What the ledger keeps of a planned slice."""
    if plan.pci is not None:
        devices = tuple(d.address for d in plan.pci.devices)
    else:
        devices = tuple(consoles.normalize_pci_address(d) or d for d in spec.devices)
    return SliceRecord(
        name=spec.name or f"slice-{plan.cpus[0]}", cpus=tuple(plan.cpus), apic_ids=tuple(plan.apic_ids),
        mem_base=plan.mem_base, mem_size=plan.mem_size, low_slot=plan.slot,
        console=plan.console.pci_address or f"io:0x{plan.console.port:x}", devices=devices,
        kernel=str(spec.kernel), initrd=str(spec.initrd) if spec.initrd else None, cmdline=plan.cmdline)


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


def write_image(mem: PhysicalMemory, image: BootImage, progress: Callable[[str], None]) -> None:
    for seg in image.segments:
        progress(f"writing {seg.name}: {seg.size} bytes at 0x{seg.addr:x}")
        for addr, buf in seg.chunks():
            if not mem.write_and_check(addr, buf):
                raise LaunchError(f"read-back of {seg.name} at 0x{addr:x} differs from what was written; "
                                  "the range may not be RAM or is in use by someone else")


def boot(spec: BootSpec, *, host: Host | None = None, machine: Machine | None = None,
         dry_run: Path | None = None, progress: Callable[[str], None] = lambda _m: None,
         ledger: Ledger | None = None) -> BootResult:
    """Plan, build and (unless ``dry_run``) launch.  With a ``ledger`` the slice is reserved
    there after the plan and before the first write; a dry run only reads it."""
    t0 = time.perf_counter()
    machine = machine or Machine.real()
    host = host or discover("/")
    held = ledger.holding() if ledger else []
    if ledger is not None:  # CPUs, memory or name of a recorded slice: refuse now, naming it
        by_num = {c.cpu: c.apic_id for c in host.cpus}
        ledger.check(SliceRecord(
            name=spec.name or f"slice-{spec.cpus[0] if spec.cpus else '?'}", cpus=tuple(spec.cpus),
            apic_ids=tuple(a for a in (by_num.get(c) for c in spec.cpus) if a is not None),
            mem_base=spec.mem_base, mem_size=spec.mem_size))
    plan = make_plan(spec, host, slot_view(slot_reader(machine.mem), held, host.boot_id))
    t1 = time.perf_counter()
    image = build_image(plan)
    t2 = time.perf_counter()
    result = BootResult(plan, image, {"plan": t1 - t0, "build": t2 - t1})
    if dry_run is not None:
        write_dry_run(dry_run, plan, image)
        result.dry_run_dir = dry_run
        result.phases["dry_run_write"] = time.perf_counter() - t2
        return result

    # Reserve first, in one transaction with the conflict check (ledger.py): of two launches
    # that want the same resources, the second is refused here, before touching anything.
    if ledger is not None:
        result.slice = row = ledger.reserve(slice_record(spec, plan))
        result.ledger_path = ledger.path
        progress(f"reserved slice '{row.name}' in the ledger {ledger.path}")
    try:
        # Everything that can still fail without a trace (the msr device) comes first.
        apic = _boot_cpu_apic(host, machine, plan.apic_mode)
    except BaseException:
        if result.slice is not None:
            ledger.release(result.slice.id)  # type: ignore[union-attr]
            result.slice = None
        raise
    if result.slice is not None:
        ledger.begin_launch(result.slice.id)  # type: ignore[union-attr]
    try:
        _launch(plan, image, machine, apic, result, progress, t0, t2)
    except BaseException as e:
        if result.slice is not None:  # its CPUs may run: it stays held until reboot, relaunch or stop
            ledger.finish(result.slice.id, error=str(e) or type(e).__name__)  # type: ignore[union-attr]
        raise
    if result.slice is not None:
        ledger.finish(result.slice.id)  # type: ignore[union-attr]
        result.slice = ledger.get(result.slice.id)  # type: ignore[union-attr]
    return result


def _boot_cpu_apic(host: Host, machine: Machine, mode: str) -> lapic.LocalApic:
    """The local APIC we send IPIs from: the boot CPU's, so pin this process there first (the
    ICR is per CPU; with maxcpus=1 it is the only online one anyway)."""
    if host.live:
        try:
            os.sched_setaffinity(0, {c.cpu for c in host.cpus if c.boot})
        except OSError:
            pass
    return machine.apic(mode)


def _launch(plan: Plan, image: BootImage, machine: Machine, apic: lapic.LocalApic, result: BootResult,
            progress: Callable[[str], None], t0: float, t2: float) -> None:
    """The writes, in order: console, park the CPUs, memory, wake."""
    if plan.console.pci_address:
        progress(f"detaching console {plan.console.pci_address} from its host driver")
        result.detached_driver = machine.pci.detach(plan.console.pci_address)
    for dev in plan.pci.devices if plan.pci else []:
        progress(f"detaching device {dev.address} from its host driver ({dev.driver or 'none'})")
        result.detached_devices[dev.address] = machine.pci.detach(dev.address)
    # INIT first: a CPU still running an earlier slice stops before its memory is overwritten.
    lapic.init_cpus(apic, plan.apic_ids)
    t3 = time.perf_counter()
    write_image(machine.mem, image, progress)
    t4 = time.perf_counter()
    progress(f"waking CPU {plan.cpus[0]} (APIC ID {plan.apic_ids[0]}) at SIPI vector 0x{plan.sipi_vector:02x}")
    lapic.start_cpu(apic, plan.apic_ids[0], plan.sipi_vector, sleep=machine.sleep)
    t5 = time.perf_counter()
    result.phases.update({"park": t3 - t2, "write": t4 - t3, "wake": t5 - t4, "total": t5 - t0})


def stop(name: str, *, host: Host, machine: Machine, ledger: Ledger,
         progress: Callable[[str], None] = lambda _m: None) -> SliceRecord:
    """INIT a slice's CPUs (they go back to wait-for-SIPI), clear its low-memory slot record and
    mark it stopped in the ledger: its CPUs, memory and slot are free again."""
    row = next((r for r in ledger.holding() if r.name == name), None)
    if row is None:
        names = ", ".join(r.name for r in ledger.holding()) or "none"
        raise UsageError(f"no slice named '{name}' in this host boot (slices: {names}; ledger {ledger.path}); "
                         "see coreslice list")
    if row.state == "reserved":
        raise UsageError(f"slice '{name}' is being launched by process {row.pid}; wait for it to finish, then stop it")
    if host.apic_mode is None:
        raise UsageError("cannot tell whether the host runs x2APIC or xAPIC; run 'modprobe msr' and retry")
    apic = _boot_cpu_apic(host, machine, host.apic_mode)
    progress(f"INIT to CPUs {','.join(map(str, row.cpus))} (APIC IDs {','.join(map(str, row.apic_ids))})")
    lapic.init_cpus(apic, list(row.apic_ids))
    if row.low_slot is not None:
        rec = slot_reader(machine.mem)(row.low_slot)
        if (rec is not None and rec.boot_id == host.boot_id and set(rec.apic_ids) == set(row.apic_ids)
                and (rec.mem_base, rec.mem_size) == (row.mem_base, row.mem_size)):
            progress(f"clearing the record in low-memory slot 0x{row.low_slot:x}")
            machine.mem.write(lowmem.record_address(row.low_slot), bytes(lowmem.RECORD_SIZE))
    ledger.mark_stopped(row.id)  # type: ignore[arg-type]
    stopped = ledger.get(row.id)  # type: ignore[arg-type]
    assert stopped is not None
    return stopped


def stderr_progress(msg: str) -> None:
    print(f"coreslice: {msg}", file=sys.stderr, flush=True)
