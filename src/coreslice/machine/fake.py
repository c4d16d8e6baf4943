"""The in-memory machine: every effect recorded, nothing done.  Tests get it from here."""

from __future__ import annotations

import struct
from pathlib import Path

from coreslice.machine import Machine
from coreslice.machine.lapic import FakeApic
from coreslice.machine.pci import FakePci
from coreslice.machine.physmem import FakeMemory
from coreslice.machine.sriov import FakeOps


class FakeGrub:
    def __init__(self):
        self.dropins: list[str] = []
        self.updates = 0

    def write_dropin(self, text: str) -> Path:
        self.dropins.append(text)
        return Path("/") / "etc/default/grub.d/coreslice.cfg"

    def update(self) -> str:
        self.updates += 1
        return "(fake update-grub)"


class FakeMachine(Machine):
    """A :class:`Machine` whose memory, APICs, PCI, SR-IOV and GRUB are in memory.

    ``preset`` fills physical memory (address -> bytes); ``sriov`` may be a prepared FakeOps.
    A SIPI "wakes" a CPU: it sets the trampoline's handshake words as a real CPU running it
    would (not counted as an effect: the CPU writes them, not coreslice), unless its APIC ID is
    in ``dead_cpus`` (never wakes) or ``stuck_cpus`` (wakes, never reaches the kernel)."""

    def __init__(self, root: Path | None = None, preset: dict[int, bytes] | None = None,
                 sriov: FakeOps | None = None):
        self.apics: list[FakeApic] = []
        self.dead_cpus: set[int] = set()
        self.stuck_cpus: set[int] = set()

        def apic(mode: str) -> FakeApic:
            a = FakeApic(mode, on_startup=self._cpu_runs_trampoline)
            self.apics.append(a)
            return a

        from coreslice.launch.dmahold import FakeDma

        super().__init__(mem=FakeMemory(preset), pci=FakePci(), apic=apic, sriov=sriov or FakeOps(),
                         grub=FakeGrub(), sleep=lambda _s: None, fake=True, dma=FakeDma())
        self.root = root

    def _cpu_runs_trampoline(self, apic_id: int, vector: int) -> None:
        from coreslice.boot import trampoline as t

        if apic_id in self.dead_cpus:
            return
        words = struct.pack("<II", t.ENTERED_MAGIC, 0 if apic_id in self.stuck_cpus else t.IN_KERNEL_MAGIC)
        self.mem._store((vector << 12) + t.HANDSHAKE_OFFSET, words)  # type: ignore[attr-defined]

    def effects(self) -> list[str]:
        """Every change made so far, in words (empty: the machine is as it was)."""
        out = [f"memory write at 0x{addr:x}" for addr, _ in self.mem.writes]  # type: ignore[attr-defined]
        out += [f"IPI 0x{cmd:x} to APIC ID {dest}" for a in self.apics for dest, cmd in a.sent]
        out += [f"detached {d}" for d in self.pci.detached]  # type: ignore[attr-defined]
        out += [f"quiesced {d}" for d in self.pci.quiesced]  # type: ignore[attr-defined]
        out += [f"reprobed {d}" for d in self.pci.reprobed]  # type: ignore[attr-defined]
        out += [f"sriov: {line}" for line in self.sriov.log]  # type: ignore[attr-defined]
        out += [f"grub drop-in written" for _ in self.grub.dropins]  # type: ignore[attr-defined]
        out += ["update-grub"] * self.grub.updates  # type: ignore[attr-defined]
        out += [f"dma: {line}" for line in self.dma.log]  # type: ignore[union-attr]
        return out
