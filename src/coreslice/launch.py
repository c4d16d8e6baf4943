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

from .boot import lowmem
from .errors import LaunchError
from .host.snapshot import Host, discover
from .image import BootImage, build_image
from .machine import lapic
from .machine.pci import PciControl, SysfsPci
from .machine.physmem import DevMem, PhysicalMemory
from .plan import Plan, make_plan
from .spec import BootSpec


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
            # ru_maxrss is in KiB on Linux: the loader's peak memory, reported for the benchmark.
            "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }


def slot_reader(mem: PhysicalMemory):
    def read(slot: int) -> lowmem.SlotRecord | None:
        return lowmem.SlotRecord.decode(mem.read(lowmem.record_address(slot), lowmem.RECORD_SIZE))
    return read


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
         dry_run: Path | None = None, progress: Callable[[str], None] = lambda _m: None) -> BootResult:
    t0 = time.perf_counter()
    machine = machine or Machine.real()
    host = host or discover("/")
    plan = make_plan(spec, host, slot_reader(machine.mem))
    t1 = time.perf_counter()
    image = build_image(plan)
    t2 = time.perf_counter()
    result = BootResult(plan, image, {"plan": t1 - t0, "build": t2 - t1})
    if dry_run is not None:
        write_dry_run(dry_run, plan, image)
        result.dry_run_dir = dry_run
        result.phases["dry_run_write"] = time.perf_counter() - t2
        return result

    # From here on the machine changes.  Order: everything that can still fail without a trace
    # (the msr device) first, then the console, then park the CPUs, then memory, then wake.
    if host.live:
        try:
            os.sched_setaffinity(0, {c.cpu for c in host.cpus if c.boot})
        except OSError:
            pass
    apic = machine.apic(plan.apic_mode)
    if plan.console.pci_address:
        progress(f"detaching console {plan.console.pci_address} from its host driver")
        result.detached_driver = machine.pci.detach(plan.console.pci_address)
    # INIT first: a CPU still running an earlier slice stops before its memory is overwritten.
    lapic.init_cpus(apic, plan.apic_ids)
    t3 = time.perf_counter()
    write_image(machine.mem, image, progress)
    t4 = time.perf_counter()
    progress(f"waking CPU {plan.cpus[0]} (APIC ID {plan.apic_ids[0]}) at SIPI vector 0x{plan.sipi_vector:02x}")
    lapic.start_cpu(apic, plan.apic_ids[0], plan.sipi_vector, sleep=machine.sleep)
    t5 = time.perf_counter()
    result.phases.update({"park": t3 - t2, "write": t4 - t3, "wake": t5 - t4, "total": t5 - t0})
    return result


def stderr_progress(msg: str) -> None:
    print(f"coreslice: {msg}", file=sys.stderr, flush=True)
