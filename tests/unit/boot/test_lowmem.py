"""The low-memory slot record: its bytes, and what decodes as "no record"."""

from __future__ import annotations

import json
import struct

import pytest

from coreslice.boot import lowmem
from coreslice.boot.trampoline import RECORD_SIZE

REC = lowmem.SlotRecord("3f1c5e0e-2b7a-4a55-9d43-6f0d2d1a9c11", (1, 2), 1 << 30, 1 << 29)


def test_wire_format():
    """Magic, u16 body length, compact JSON, NUL padding: what earlier launches wrote and later
    ones must still read."""
    raw = REC.encode()
    assert len(raw) == RECORD_SIZE and raw[:8] == b"CSLICE01"
    (length,) = struct.unpack_from("<H", raw, 8)
    assert json.loads(raw[10:10 + length]) == {"boot_id": REC.boot_id, "apic_ids": [1, 2], "mem": [1 << 30, 1 << 29]}
    assert raw[10 + length:] == bytes(RECORD_SIZE - 10 - length)
    assert lowmem.SlotRecord.decode(raw) == REC


@pytest.mark.parametrize("raw", [
    b"", b"CSLICE01", bytes(RECORD_SIZE), b"CSLICE02" + REC.encode()[8:],
    REC.encode()[:40],                                   # cut inside the body
    b"CSLICE01" + struct.pack("<H", 0xFFFF) + bytes(RECORD_SIZE - 10),
    b"CSLICE01" + struct.pack("<H", 5) + b"{abc}",       # not JSON
    b"CSLICE01" + struct.pack("<H", 2) + b"{}",          # JSON without the keys
])
def test_anything_else_is_no_record(raw):
    assert lowmem.SlotRecord.decode(raw) is None


def test_a_record_too_large_for_its_page_is_refused():
    with pytest.raises(ValueError, match="exceeds 256"):
        lowmem.SlotRecord("x" * 300, (), 0, 0).encode()
