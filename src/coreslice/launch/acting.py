"""The act phase of a launch: the only code that changes the machine for a boot, in order.

    VFs prepared ─► functions detached ─► CPUs INIT ─► image written ─► first CPU woken
                                                                  ─► handshake: it reached the kernel

Every change before the INIT is logged with how to undo it (:class:`UndoLog`): when a later
step fails, they are undone newest first, and the error says what was undone.  From the INIT
on nothing can be undone (a CPU that ran an earlier slice has stopped, its memory is being
overwritten): a failure then leaves the slice ``failed`` in the ledger, holding its resources
until it is stopped or relaunched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from coreslice.boot import trampoline
from coreslice.boot.image import BootImage
from coreslice.errors import LaunchError
from coreslice.launch import vfprep
from coreslice.machine import Machine, lapic
from coreslice.machine.physmem import PhysicalMemory
from coreslice.plan.boot import Plan
from coreslice.plan.vfs import Checked

Progress = Callable[[str], None]
Phase = Callable[[str], None]  # records the step about to begin (ledger.PHASES)

# How long boot waits for the woken CPU's handshake.  On hardware it arrives within
# microseconds of the SIPI; an emulated CPU (QEMU under TCG) takes up to tens of milliseconds.
WAKE_TIMEOUT = 2.0
WAKE_POLL = 0.0002


@dataclass
class UndoLog:
    entries: list[tuple[str, Callable[[], None]]] = field(default_factory=list)

    def add(self, what: str, undo: Callable[[], None]) -> None:
        self.entries.append((what, undo))

    def undo(self) -> str:
        """Undo everything logged, newest first; say what was and what could not be undone."""
        if not self.entries:
            return "nothing had been changed"
        n = len(self.entries)
        failed = vfprep.undo_all(self.entries)
        if failed:
            return f"undid {n - len(failed)} of {n} changes; could not undo: {'; '.join(failed)}: fix these by hand"
        return f"undid all {n} changes made before the failure"


@dataclass
class Acted:
    vfs: list[vfprep.PreparedVf] = field(default_factory=list)
    detached: dict[str, str | None] = field(default_factory=dict)  # PCI address -> old driver
    phases: dict[str, float] = field(default_factory=dict)
    wake: dict[str, float] = field(default_factory=dict)  # handshake latencies from the first SIPI


class UndoneError(LaunchError):
    """A step before the INIT failed and every change was undone: the machine is as it was."""


def write_image(mem: PhysicalMemory, image: BootImage, progress: Progress) -> None:
    """Every segment, each read back and compared (a range that is not RAM, or that someone
    else writes, shows here)."""
    for seg in image.segments:
        progress(f"writing {seg.name}: {seg.size} bytes at 0x{seg.addr:x}")
        if seg.data is not None:
            ok = mem.write_and_check(seg.addr, seg.data)
        else:
            ok = mem.write_file_and_check(seg.addr, seg.path, seg.offset, seg.size)  # type: ignore[arg-type]
        if not ok:
            raise LaunchError(f"read-back of {seg.name} at 0x{seg.addr:x}-0x{seg.addr + seg.size - 1:x} differs "
                              "from what was written; the range may not be RAM or is in use by someone else")


def prepare_devices(plan: Plan, vfs: Sequence[Checked], machine: Machine, progress: Progress,
                    acted: Acted, undo: UndoLog) -> None:
    """Before the INIT (undoable): the VFs, then every assigned function away from its host driver."""
    t = time.perf_counter()
    if vfs:
        prep = vfprep.prepare(vfs, machine.sriov, progress)  # undoes itself if it fails
        acted.vfs = prep.vfs
        undo.add("the VF preparation", lambda: _undo_prep(prep))
    for fn in plan.pci.functions if plan.pci else []:  # the console first, then the devices
        if any(v.address == fn.address for v in acted.vfs):
            continue  # vfprep unbound it already
        progress(f"detaching {fn.role} {fn.address} from its host driver ({fn.driver or 'none'})")
        old = machine.pci.detach(fn.address)
        acted.detached[fn.address] = old
        undo.add(f"driver {old or '(none: override only)'} of {fn.address}",
                 lambda a=fn.address, d=old: machine.pci.attach(a, d))
    acted.phases["devices"] = time.perf_counter() - t


def _undo_prep(prep: vfprep.Preparation) -> None:
    failed = prep.undo()
    if failed:
        raise LaunchError("; ".join(failed))


def start(plan: Plan, image: BootImage, machine: Machine, apic: lapic.LocalApic, progress: Progress,
          acted: Acted, phase: Phase = lambda _p: None, scrub=None, wake_timeout: float = WAKE_TIMEOUT) -> None:
    """The point of no return: INIT the slice's CPUs, scrub and write the image, wake the first
    CPU and wait until it reports reaching the kernel.  ``scrub(progress)`` zeroes the slice's
    RAM (launch/scrub.py) once its CPUs are parked, so the slice never sees what the last left."""
    t2 = time.perf_counter()
    phase("parking")
    # INIT first: a CPU still running an earlier slice stops before its memory is overwritten.
    lapic.init_cpus(apic, plan.apic_ids)
    t3 = time.perf_counter()
    phase("writing")
    if scrub is not None:
        scrub(progress)
    t3s = time.perf_counter()
    write_image(machine.mem, image, progress)
    t4 = time.perf_counter()
    phase("waking")
    progress(f"waking CPU {plan.cpus[0]} (APIC ID {plan.apic_ids[0]}) at SIPI vector 0x{plan.sipi_vector:02x}")
    sipi = lapic.start_cpu(apic, plan.apic_ids[0], plan.sipi_vector, sleep=machine.sleep)
    acted.wake = wait_for_kernel(machine, plan, sipi, wake_timeout)
    t5 = time.perf_counter()
    phase("woken")
    acted.phases.update({"park": t3 - t2, "scrub": t3s - t3, "write": t4 - t3s, "wake": t5 - t4})


def wait_for_kernel(machine: Machine, plan: Plan, sipi: float, timeout: float) -> dict[str, float]:
    """Poll the trampoline's handshake words (boot/trampoline.py) until the woken CPU says it
    jumps to the kernel; LaunchError when it does not within ``timeout`` seconds of the SIPI."""
    addr = plan.slot + trampoline.HANDSHAKE_OFFSET
    entered = None
    while True:
        state = trampoline.handshake(machine.mem.read(addr, trampoline.HANDSHAKE_SIZE))
        now = time.perf_counter()
        if state != "none" and entered is None:
            entered = now - sipi
        if state == "kernel":
            return {"entered_s": entered if entered is not None else now - sipi, "kernel_s": now - sipi}
        if now - sipi > timeout:
            break
        machine.sleep(WAKE_POLL)
    cpu = f"CPU {plan.cpus[0]} (APIC ID {plan.apic_ids[0]})"
    if state == "none":
        raise LaunchError(f"{cpu} did not wake within {timeout:g} s of its SIPI: the trampoline at 0x{plan.slot:x} "
                          "never ran; check that the CPU is offline in the host but present and enabled in "
                          "firmware (and its APIC ID in /proc/cpuinfo), then coreslice stop or restart the slice")
    raise LaunchError(f"{cpu} woke but did not reach the kernel entry within {timeout:g} s (it stopped while "
                      "switching to long mode: see the page tables and entry in a --dry-run plan.json); "
                      "coreslice stop or restart the slice")
