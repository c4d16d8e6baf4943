"""The local APIC classes themselves, against recorded register and MSR accesses: the ICR
encoding (SDM Vol. 3A "Interrupt Command Register"), ICR2 before ICR, one access per register,
delivery status waited for, and the INIT-SIPI-SIPI delays."""

from __future__ import annotations

import struct

import pytest

from coreslice.errors import LaunchError
from coreslice.machine import lapic


class RecordingRegisters:
    """APIC registers that record every access; the ICR reports "send pending" for
    ``busy_reads`` reads after each write to it (as a real APIC does while it delivers)."""

    def __init__(self, busy_reads: int = 2):
        self.values: dict[int, int] = {}
        self.log: list[tuple[str, int, int]] = []
        self.busy_reads, self._busy = busy_reads, 0

    def read32(self, offset):
        v = self.values.get(offset, 0)
        if offset == lapic.ICR_LOW and self._busy:
            self._busy -= 1
            v |= lapic.DELIVERY_PENDING
        self.log.append(("r", offset, v))
        return v

    def write32(self, offset, value):
        assert 0 <= value < 1 << 32
        self.log.append(("w", offset, value))
        self.values[offset] = value
        if offset == lapic.ICR_LOW:
            self._busy = self.busy_reads


def writes(regs):
    return [(off, v) for op, off, v in regs.log if op == "w"]


def test_xapic_writes_icr2_then_icr_once_each_and_waits_for_delivery():
    regs = RecordingRegisters(busy_reads=3)
    apic = lapic.XApic(regs, sleep=lambda s: None)
    apic.send_icr(5, lapic.DM_STARTUP | 0x20)
    assert writes(regs) == [(lapic.ICR_HIGH, 5 << 24), (lapic.ICR_LOW, 0x620)]
    # After the send, ICR is read until delivery status is idle (3 pending reads, then idle).
    after = regs.log[regs.log.index(("w", lapic.ICR_LOW, 0x620)) + 1:]
    icr_reads = [v for op, off, v in after if op == "r" and off == lapic.ICR_LOW]
    assert [bool(v & lapic.DELIVERY_PENDING) for v in icr_reads] == [True, True, True, False]


def test_xapic_waits_for_an_earlier_ipi_before_writing():
    regs = RecordingRegisters(busy_reads=2)
    regs._busy = 2  # an IPI still being delivered
    lapic.XApic(regs, sleep=lambda s: None).send_icr(1, lapic.DM_INIT)
    first_write = next(i for i, e in enumerate(regs.log) if e[0] == "w")
    assert [e[0] for e in regs.log[:first_write]] == ["r", "r", "r"]


def test_a_wedged_icr_is_an_error_after_the_deadline():
    regs = RecordingRegisters(busy_reads=10**9)
    t = [0.0]

    def sleep(s):
        t[0] += s
    apic = lapic.XApic(regs, clock=lambda: t[0], sleep=sleep)
    with pytest.raises(LaunchError, match="stayed busy"):
        apic.send_icr(1, lapic.DM_INIT)
    assert lapic.ICR_IDLE_TIMEOUT <= t[0] < lapic.ICR_IDLE_TIMEOUT + 0.01


def test_a_destination_changed_under_us_is_reported():
    class Racing(RecordingRegisters):
        def write32(self, offset, value):
            super().write32(offset, value)
            if offset == lapic.ICR_LOW:
                self.values[lapic.ICR_HIGH] = 0  # the host kernel's IPI rewrote ICR2
    with pytest.raises(LaunchError, match="destination changed"):
        lapic.XApic(Racing(busy_reads=0), sleep=lambda s: None).send_icr(3, lapic.DM_INIT)


def test_xapic_refuses_an_8_bit_overflow():
    with pytest.raises(LaunchError, match="does not fit xAPIC"):
        lapic.XApic(RecordingRegisters(), sleep=lambda s: None).send_icr(0x100, lapic.DM_INIT)


def test_mmio_page_accesses_the_register_at_its_offset():
    buf = bytearray(4096)
    page = lapic.MmioApicPage.over(buf)
    page.write32(lapic.ICR_HIGH, 0x07000000)
    assert buf[0x310:0x314] == struct.pack("<I", 0x07000000) and not any(buf[:0x310]) and not any(buf[0x314:])
    assert page.read32(lapic.ICR_HIGH) == 0x07000000


def test_x2apic_icr_is_one_64_bit_msr_write_with_a_32_bit_destination(tmp_path):
    msr = tmp_path / "msr"
    msr.write_bytes(bytes(0x900))
    lapic.X2Apic(str(msr)).send_icr(258, lapic.DM_INIT | lapic.LEVEL_ASSERT)
    raw = msr.read_bytes()
    value = struct.unpack_from("<Q", raw, lapic.X2APIC_ICR_MSR)[0]
    # SDM "x2APIC ICR": destination in bits 32-63; APIC ID 258 needs more than 8 bits.
    assert value == (258 << 32) | lapic.DM_INIT | lapic.LEVEL_ASSERT
    assert raw[:lapic.X2APIC_ICR_MSR] == bytes(lapic.X2APIC_ICR_MSR)


class Recorder:
    def __init__(self, mode):
        self.mode, self.events = mode, []

    def send_icr(self, apic_id, command):
        self.events.append(("ipi", apic_id, command))


def test_init_sipi_sipi_sequence_and_delays():
    a = Recorder("xapic")
    lapic.init_cpus(a, [2, 3])
    lapic.start_cpu(a, 2, 0x20, sleep=lambda s: a.events.append(("sleep", s)))
    init, deassert = lapic.DM_INIT | lapic.LEVEL_ASSERT | lapic.TRIGGER_LEVEL, lapic.DM_INIT | lapic.TRIGGER_LEVEL
    sipi = lapic.DM_STARTUP | 0x20
    # SDM Vol. 3A "Typical BSP Initialization Sequence": INIT, 10 ms, SIPI, 200 us, SIPI.
    assert a.events == [("ipi", 2, init), ("ipi", 3, init), ("ipi", 2, deassert), ("ipi", 3, deassert),
                        ("sleep", 0.010), ("ipi", 2, sipi), ("sleep", 0.0002), ("ipi", 2, sipi), ("sleep", 0.0002)]


def test_x2apic_has_no_init_deassert():
    a = Recorder("x2apic")
    lapic.init_cpus(a, [300])
    assert a.events == [("ipi", 300, lapic.DM_INIT | lapic.LEVEL_ASSERT | lapic.TRIGGER_LEVEL)]
