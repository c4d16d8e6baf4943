"""Parsing sizes and addresses as people write them."""

from __future__ import annotations

import re

from coreslice.errors import UsageError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(0x[0-9a-fA-F]+|\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, what: str = "size") -> int:
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"{what} '{text}' is not a size; write e.g. 512M, 1G or 0x40000000")
    num, unit = m.groups()
    return int(num, 0) * _UNITS[unit.upper()]


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
