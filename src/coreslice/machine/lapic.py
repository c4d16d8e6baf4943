"""Sending INIT and STARTUP IPIs from the host's boot CPU to a parked CPU.

Intel SDM Vol. 3A, APIC chapter "Interrupt Command Register (ICR)" and MP chapter "Typical BSP
Initialization Sequence" (INIT-SIPI-SIPI).  In xAPIC mode the ICR is two 32-bit registers in the
APIC page; in x2APIC mode it is one 64-bit MSR (0x830, SDM "x2APIC Register Address Space"),
written here through the msr driver.  The host has only its boot CPU
online and we pin ourselves to it, so the ICR we write is the boot CPU's.
"""

from __future__ import annotations

import os
import struct
import subprocess
import time
from typing import Protocol

from coreslice.errors import LaunchError
from coreslice.machine.physmem import PhysicalMemory

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


def start_cpu(apic: LocalApic, apic_id: int, vector: int, sleep=time.sleep) -> None:
    if not 0 < vector < 0x100:
        raise LaunchError(f"SIPI vector 0x{vector:x} out of range (the trampoline must sit below 1 MiB)")
    sleep(INIT_DELAY)
    for _ in range(2):
        apic.send_icr(apic_id, DM_STARTUP | vector)
        sleep(SIPI_DELAY)


class XApic:
    mode = "xapic"

    def __init__(self, mem: PhysicalMemory):
        self.mem = mem

    def _wait_idle(self) -> None:
        for _ in range(1000):
            low = struct.unpack("<I", self.mem.read(APIC_PAGE + ICR_LOW, 4))[0]
            if not low & DELIVERY_PENDING:
                return
            time.sleep(0.0001)
        raise LaunchError("local APIC ICR stayed busy (delivery status pending) for 100 ms")

    def send_icr(self, apic_id: int, command: int) -> None:
        if apic_id > 0xFF:
            raise LaunchError(f"APIC ID {apic_id} does not fit xAPIC destination (8 bits); the host must run x2APIC")
        self._wait_idle()
        # The high half (destination, bits 56-63) first: writing the low half sends the IPI.
        self.mem.write(APIC_PAGE + ICR_HIGH, struct.pack("<I", apic_id << 24))
        self.mem.write(APIC_PAGE + ICR_LOW, struct.pack("<I", command))
        self._wait_idle()


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
    def __init__(self, mode: str = "xapic"):
        self.mode = mode
        self.sent: list[tuple[int, int]] = []

    def send_icr(self, apic_id: int, command: int) -> None:
        self.sent.append((apic_id, command))
