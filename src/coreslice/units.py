"""Parsing sizes and addresses as people write them."""

from __future__ import annotations

import re

from coreslice.errors import UsageError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# ASCII digits only ([0-9], not \d: int() would take "١" too); at most 40 of them, so that no
# int() of a 5000-digit string runs into Python's digit limit.
_SIZE = re.compile(r"^\s*(0x[0-9a-fA-F]{1,40}|[0-9]{1,40})\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
LIMIT = 1 << 64  # x86-64 physical addresses have at most 52 bits; 64 bounds every size and address


def parse_size(text: str, what: str = "size") -> int:
    shown = text if len(text) <= 40 else text[:40] + "..."
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"{what} '{shown}' is not a size; write e.g. 512M, 1G or 0x40000000")
    num, unit = m.groups()
    # int(num, 0) would refuse "010": leading zeros are decimal here, as people write them.
    value = (int(num, 16) if num[:2].lower() == "0x" else int(num, 10)) * _UNITS[unit.upper()]
    if value >= LIMIT:
        raise UsageError(f"{what} '{shown.strip()}' is beyond the 64-bit physical address space; "
                         "write e.g. 512M, 1G or 0x40000000")
    return value


def format_size(n: int) -> str:
    for unit, div in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def parse_memory(text: str) -> tuple[int, int | None]:
    """'SIZE@BASE' -> (size, base); 'SIZE' -> (size, None)."""
    size_text, at, base_text = text.partition("@")
    size = parse_size(size_text, "memory size")
    base = parse_size(base_text, "memory base") if at else None
    return size, base
