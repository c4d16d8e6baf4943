"""Sending INIT and STARTUP IPIs from the host's boot CPU to a parked CPU.

Intel SDM Vol. 3A, APIC chapter "Interrupt Command Register (ICR)" and MP chapter "Typical BSP
Initialization Sequence" (INIT-SIPI-SIPI).  In xAPIC mode the ICR is two 32-bit registers in the
APIC page; in x2APIC mode it is one 64-bit MSR (0x830, SDM "x2APIC Register Address Space"),
written here through the msr driver.  The host has only its boot CPU
online and we pin ourselves to it, so the ICR we write is the boot CPU's.
"""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import time
from typing import Protocol

from coreslice.errors import LaunchError

APIC_PAGE = 0xFEE00000
ICR_LOW = 0x300
ICR_HIGH = 0x310
X2APIC_ICR_MSR = 0x830

# ICR fields (SDM Vol. 3A, figure "Interrupt Command Register (ICR)")
DM_INIT = 0b101 << 8
DM_STARTUP = 0b110 << 8
LEVEL_ASSERT = 1 << 14
TRIGGER_LEVEL = 1 << 15
DELIVERY_PENDING = 1 << 12

# SDM "Typical BSP Initialization Sequence" / MP spec B.4: 10 ms after INIT, 200 us between SIPIs.
INIT_DELAY = 0.010
SIPI_DELAY = 0.0002


class LocalApic(Protocol):
    mode: str
    def send_icr(self, apic_id: int, command: int) -> None: ...


def init_cpus(apic: LocalApic, apic_ids: list[int]) -> None:
    """INIT every CPU: a running one drops what it does and waits for a SIPI, a parked one stays parked."""
    for apic_id in apic_ids:
        apic.send_icr(apic_id, DM_INIT | LEVEL_ASSERT | TRIGGER_LEVEL)
    if apic.mode == "xapic":
        # INIT level de-assert: needed by older processors, ignored by newer (SDM, ICR); in
        # x2APIC mode it is not supported at all.
        for apic_id in apic_ids:
            apic.send_icr(apic_id, DM_INIT | TRIGGER_LEVEL)


def start_cpu(apic: LocalApic, apic_id: int, vector: int, sleep=time.sleep) -> float:
    """The two SIPIs (after init_cpus); returns time.perf_counter() at the first, from which the
    wake handshake's latency counts."""
    if not 0 < vector < 0x100:
        raise LaunchError(f"SIPI vector 0x{vector:x} out of range (the trampoline must sit below 1 MiB)")
    sleep(INIT_DELAY)
    first = None
    for _ in range(2):
        apic.send_icr(apic_id, DM_STARTUP | vector)
        first = first if first is not None else time.perf_counter()
        sleep(SIPI_DELAY)
    assert first is not None
    return first


class ApicRegisters(Protocol):
    """The local APIC's 32-bit registers, by offset in its page (SDM Vol. 3A, "Local APIC
    Register Address Map"): each access is exactly one aligned 32-bit load or store."""

    def read32(self, offset: int) -> int: ...
    def write32(self, offset: int, value: int) -> None: ...


class MmioApicPage:
    """The APIC page mapped uncached through /dev/mem.

    Registers are read and written as items of a memoryview of format 'I': CPython copies a
    fixed 4 bytes for one item (one aligned 32-bit mov).  A slice assignment of 4 bytes goes
    through libc's memmove instead, which may store the same 4 bytes twice (two overlapping
    32-bit stores, seen with a hardware watchpoint): a write to the ICR would then send its IPI
    twice, back to back, without the wait for delivery status the SDM asks for."""

    def __init__(self, path: str = "/dev/mem", base: int = APIC_PAGE):
        self.path, self.base = path, base
        self._map: mmap.mmap | None = None
        self._regs: memoryview | None = None

    @classmethod
    def over(cls, buffer) -> "MmioApicPage":
        """The same register access over a writable 4 KiB buffer (tests)."""
        page = cls()
        page._regs = memoryview(buffer).cast("I")
        return page

    def _registers(self) -> memoryview:
        if self._regs is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_SYNC)  # O_SYNC: an uncached (UC-) mapping
            except OSError as e:
                raise LaunchError(f"cannot open {self.path}: {e.strerror}; run as root on a kernel with /dev/mem") from e
            try:
                self._map = mmap.mmap(fd, 0x1000, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=self.base)
            except OSError as e:
                raise LaunchError(f"cannot map the local APIC page 0x{self.base:x} through {self.path}: {e.strerror}; "
                                  "the host must run xAPIC mode (x2APIC has no APIC page)") from e
            finally:
                os.close(fd)
            self._regs = memoryview(self._map).cast("I")
        return self._regs

    def read32(self, offset: int) -> int:
        assert offset % 16 == 0, "APIC registers are 16-byte aligned"
        return self._registers()[offset // 4]

    def write32(self, offset: int, value: int) -> None:
        assert offset % 16 == 0, "APIC registers are 16-byte aligned"
        self._registers()[offset // 4] = value


# How long the ICR may stay busy: on hardware delivery takes microseconds; 100 ms is a wedge.
ICR_IDLE_TIMEOUT = 0.1


class XApic:
    """IPIs through the xAPIC ICR: ICR2 (0x310, destination in bits 24-31) first, then ICR
    (0x300), whose write sends the IPI (SDM Vol. 3A, "Interrupt Command Register (ICR)").

    The pair is not atomic: an interrupt on this CPU between the two writes could run a host
    kernel IPI that rewrites ICR2.  On a host booted with maxcpus=1 that does not happen: with
    one CPU online the kernel's only IPIs are self-IPIs (irq_work), sent with the "self"
    destination shorthand through ICR alone, never writing ICR2.  As a guard against anything
    else, ICR2 is read back after the send: a changed destination is reported, not ignored.
    """

    mode = "xapic"

    def __init__(self, regs: ApicRegisters, clock=time.monotonic, sleep=time.sleep):
        self.regs, self._clock, self._sleep = regs, clock, sleep

    def _wait_idle(self) -> None:
        deadline = self._clock() + ICR_IDLE_TIMEOUT
        while self.regs.read32(ICR_LOW) & DELIVERY_PENDING:
            if self._clock() > deadline:
                raise LaunchError(f"local APIC ICR stayed busy (delivery status pending) for "
                                  f"{ICR_IDLE_TIMEOUT * 1000:.0f} ms; the APIC is wedged: reboot the host")
            self._sleep(0.0001)

    def send_icr(self, apic_id: int, command: int) -> None:
        if apic_id > 0xFF:
            raise LaunchError(f"APIC ID {apic_id} does not fit xAPIC destination (8 bits); the host must run x2APIC")
        self._wait_idle()
        self.regs.write32(ICR_HIGH, apic_id << 24)
        self.regs.write32(ICR_LOW, command)
        self._wait_idle()
        if self.regs.read32(ICR_HIGH) >> 24 != apic_id:
            raise LaunchError(f"the ICR destination changed while an IPI to APIC ID {apic_id} was sent (another "
                              "IPI on this CPU); the IPI may have gone elsewhere: boot the host with maxcpus=1")


def ensure_msr_device(cpu: int = 0) -> str:
    path = f"/dev/cpu/{cpu}/msr"
    if not os.path.exists(path):
        r = subprocess.run(["modprobe", "msr"], capture_output=True, text=True)
        if not os.path.exists(path):
            raise LaunchError(f"{path} missing and 'modprobe msr' failed ({r.stderr.strip() or r.returncode}); "
                              "load the msr module (CONFIG_X86_MSR)")
    return path


class X2Apic:
    mode = "x2apic"

    def __init__(self, msr_path: str):
        self.msr_path = msr_path

    def send_icr(self, apic_id: int, command: int) -> None:
        # x2APIC ICR: destination in bits 32-63 (SDM "x2APIC ICR"); one 64-bit write sends it.
        value = (apic_id << 32) | command
        fd = os.open(self.msr_path, os.O_WRONLY)
        try:
            os.pwrite(fd, struct.pack("<Q", value), X2APIC_ICR_MSR)
        except OSError as e:
            raise LaunchError(f"writing the x2APIC ICR through {self.msr_path} failed: {e.strerror}") from e
        finally:
            os.close(fd)


class FakeApic:
    """Records every ICR write; ``on_startup(apic_id, vector)`` plays the woken CPU (FakeMachine)."""

    def __init__(self, mode: str = "xapic", on_startup=None):
        self.mode = mode
        self.sent: list[tuple[int, int]] = []
        self.on_startup = on_startup

    def send_icr(self, apic_id: int, command: int) -> None:
        self.sent.append((apic_id, command))
        if command & 0b111 << 8 == DM_STARTUP and self.on_startup is not None:
            self.on_startup(apic_id, command & 0xFF)
