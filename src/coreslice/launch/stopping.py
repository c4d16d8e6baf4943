"""Stopping a slice: devices quiet, CPUs parked, memory scrubbed, resources released.

    quiesce its PCI functions ─► INIT its CPUs ─► bus master off again ─► its IOMMU domain released
        ─► scrub RAM + low-memory slot
        ─► ledger: stopped ─► (--return-devices) host drivers

Devices go first: a function still bus-mastering could write the memory again after the scrub,
and a CPU parked before its devices stop may leave them mid-transfer with nobody to answer.
Until the INIT the slice's kernel still runs and may set Bus Master Enable again (a driver's
timeout handler resetting its controller, say), so it is cleared once more after the INIT, when
nothing in the slice can set it.
Only functions no host driver has taken back are touched (a launcher killed while detaching may
have left some with the host: they were never the slice's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coreslice.boot import lowmem
from coreslice.errors import LaunchError, UsageError
from coreslice.host.snapshot import Host
from coreslice.launch import scrub as scrubbing
from coreslice.ledger import Ledger, SliceRecord, pid_alive
from coreslice.machine import Machine, lapic


@dataclass
class Stopped:
    slice: SliceRecord
    devices: dict[str, list[str]] = field(default_factory=dict)   # function -> what was done
    returned: dict[str, str | None] = field(default_factory=dict)  # function -> host driver now
    scrubbed_bytes: int = 0
    scrub_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    dma: str | None = None  # what became of its IOMMU domain (None: it had none)

    def to_json(self) -> dict:
        return {"slice": self.slice.to_json(), "devices": self.devices, "returned": self.returned, "dma": self.dma,
                "scrubbed_bytes": self.scrubbed_bytes, "scrub_s": round(self.scrub_s, 6),
                "warnings": self.warnings}


def find(name: str, ledger: Ledger) -> SliceRecord:
    """The holding slice called ``name``; UsageError naming the ones there are."""
    holding = ledger.holding()
    row = next((r for r in holding if r.name == name), None)
    if row is None:
        names = ", ".join(r.name for r in holding) or "none"
        raise UsageError(f"no slice named '{name}' in this host boot (slices: {names}; ledger {ledger.path}); "
                         "see coreslice list")
    if row.state in ("reserved", "launching") and pid_alive(row.pid):
        raise UsageError(f"slice '{name}' is being launched by process {row.pid}; wait for it to finish "
                         f"(or kill it), then stop it")
    return row


def functions(row: SliceRecord) -> list[str]:
    """The PCI functions the slice was given: its devices, then a PCI console."""
    return sorted(row.pci_functions())


def stop(name: str, *, host: Host, machine: Machine, ledger: Ledger, progress=lambda _m: None,
         scrub: bool = True, return_devices: bool = False) -> Stopped:
    from coreslice.launch.session import boot_cpu_apic, slot_reader  # session imports this module lazily

    row = find(name, ledger)
    if host.apic_mode is None:
        raise UsageError("cannot tell whether the host runs x2APIC or xAPIC; run 'modprobe msr' and retry")
    apic = boot_cpu_apic(host, machine, host.apic_mode)  # the msr device: can fail before any effect
    out = Stopped(row)
    quiesce(functions(row), host, machine, out.devices, out.warnings, progress)
    progress(f"INIT to CPUs {','.join(map(str, row.cpus))} (APIC IDs {','.join(map(str, row.apic_ids))})")
    lapic.init_cpus(apic, list(row.apic_ids))
    quiesce_again(machine, out.devices, out.warnings)
    if machine.dma is not None:
        # Now that its functions are quiet: the domain goes (vfio-pci resets them once more and
        # leaves them unbound); from here a stray DMA faults in the host's default domain.
        try:
            out.dma = machine.dma.release(row.name)  # type: ignore[attr-defined]
        except OSError as e:
            out.warnings.append(f"ending the DMA holder of '{row.name}': {e.strerror}")
        if out.dma:
            progress(out.dma)
    slot = row.low_slot
    if slot is not None:
        rec = slot_reader(machine.mem)(slot)
        ours = rec is None or (rec.boot_id == host.boot_id and set(rec.apic_ids) == set(row.apic_ids)
                               and (rec.mem_base, rec.mem_size) == (row.mem_base, row.mem_size))
        if not ours:
            out.warnings.append(f"low-memory slot 0x{slot:x} holds another slice's record: left alone")
            slot = None
    if scrub:
        spans = scrubbing.ranges(row.mem_base, row.mem_size, slot)
        out.scrub_s = scrubbing.scrub(machine.mem, spans, progress)
        out.scrubbed_bytes = sum(size for _, size in spans)
    elif slot is not None:
        progress(f"clearing the record in low-memory slot 0x{slot:x} (--no-scrub: memory left as it is)")
        machine.mem.write(lowmem.record_address(slot), bytes(lowmem.RECORD_SIZE))
    writable = Ledger(ledger.path, ledger.boot_id)
    writable.mark_stopped(row.id)  # type: ignore[arg-type]
    stopped = writable.get(row.id)  # type: ignore[arg-type]
    assert stopped is not None
    out.slice = stopped
    if return_devices:
        for fn in functions(row):
            progress(f"giving {fn} back to the host")
            try:
                out.returned[fn] = machine.pci.reprobe(fn)
            except LaunchError as e:  # the slice is stopped; say what is left to do
                out.warnings.append(str(e))
    return out


def quiesce(fns: list[str], host: Host, machine: Machine, devices: dict[str, list[str]], warnings: list[str],
             progress=lambda _m: None) -> None:
    """Quiet each of a slice's functions that no host driver has (what was done goes to
    ``devices``); one that cannot be quieted is a warning, never a reason to stop short: a
    function gone (VF removed, hot-unplug) or whose reset failed must not keep the CPUs from
    being parked and the memory from being scrubbed."""
    for fn in fns:
        driver = host_driver(host, fn)
        if driver is not None and driver not in ("vfio-pci", "pci-stub"):
            warnings.append(f"{fn} is bound to the host driver {driver}: not the slice's, left alone")
            continue
        progress(f"quieting {fn}")
        try:
            devices[fn] = machine.pci.quiesce(fn)
        except LaunchError as e:
            warnings.append(str(e))
            continue
        progress(f"  {fn}: {', '.join(devices[fn])}")


def quiesce_again(machine: Machine, devices: dict[str, list[str]], warnings: list[str]) -> None:
    """After the INIT: Bus Master Enable off once more on the functions quiesce() quieted."""
    for fn in devices:
        try:
            if machine.pci.bus_master_off(fn):
                devices[fn].append("bus master on again before the INIT: off again")
        except LaunchError as e:
            warnings.append(str(e))


def host_driver(host: Host, address: str) -> str | None:
    link = host.root / "sys/bus/pci/devices" / address / "driver"
    return link.resolve().name if link.exists() else None
