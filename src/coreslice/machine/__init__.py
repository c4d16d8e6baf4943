"""The narrow interfaces through which coreslice changes the machine, and the one place that
chooses between the real machine and the in-memory one.

Every effect goes through a :class:`Machine`: physical memory (/dev/mem), the local APIC (xAPIC
page or x2APIC MSR), PCI driver binding (sysfs), the slices' IOMMU domains (VFIO), SR-IOV (sysfs, netlink, NVMe admin commands)
and the boot loader configuration (GRUB drop-in, update-grub).  :func:`real` drives the live
host; :class:`coreslice.machine.fake.FakeMachine` records every effect in memory.  Commands ask
:func:`for_host`; tests choose the fake with :func:`using` (in process) or
``CORESLICE_FAKE_MACHINE=1`` (for a child ``coreslice`` run on a captured host tree).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from coreslice.machine.grub import Grub, RealGrub
from coreslice.machine.lapic import LocalApic
from coreslice.machine.pci import PciControl, SysfsPci
from coreslice.machine.physmem import DevMem, PhysicalMemory
from coreslice.machine.sriov import RealOps, SriovOps

FAKE_MACHINE_ENV = "CORESLICE_FAKE_MACHINE"


@dataclass
class Machine:
    mem: PhysicalMemory
    pci: PciControl
    apic: Callable[[str], LocalApic]   # "xapic" | "x2apic" -> the boot CPU's local APIC
    sriov: SriovOps
    grub: Grub
    sleep: Callable[[float], None] = time.sleep
    fake: bool = field(default=False)
    # The slices' IOMMU domains (launch/dmahold.py RealDma / FakeDma); None: never confined.
    dma: object | None = None


def real(root: Path = Path("/")) -> Machine:
    from coreslice.machine import lapic

    def make_apic(mode: str) -> LocalApic:
        if mode == "x2apic":
            return lapic.X2Apic(lapic.ensure_msr_device(0))
        return lapic.XApic(lapic.MmioApicPage())

    from coreslice.launch.dmahold import RealDma

    return Machine(mem=DevMem(), pci=SysfsPci(root), apic=make_apic, sriov=RealOps(root), grub=RealGrub(root),
                   dma=RealDma(root))


_selected: list[Machine] = []


@contextlib.contextmanager
def using(machine: Machine) -> Iterator[Machine]:
    """Within the block, every command acts on ``machine`` (tests)."""
    _selected.append(machine)
    try:
        yield machine
    finally:
        _selected.remove(machine)


def for_host(live: bool, root: Path = Path("/")) -> Machine | None:
    """The machine a command acts on: the one chosen with :func:`using`; else the real one for
    the live host; else, for a captured tree, the in-memory one when ``CORESLICE_FAKE_MACHINE=1``
    (a child process in tests), or None (the tree describes another machine: no effects)."""
    if _selected:
        return _selected[-1]
    if live:
        return real(root)
    if os.environ.get(FAKE_MACHINE_ENV) == "1":
        from coreslice.machine.fake import FakeMachine

        return FakeMachine(root)
    return None
