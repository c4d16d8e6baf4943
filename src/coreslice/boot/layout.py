"""Sizes and alignment helpers shared by everything that places boot data in physical memory.

One place, so that the plan, the page tables and the zero page agree on what a page is.
"""

from __future__ import annotations

PAGE = 0x1000          # x86 base page (SDM Vol. 3A §4.5); also the zero page's size
MIB = 1 << 20
GIB = 1 << 30

# Room the slice kernel needs beyond its own image and initrd before it can reach user space.
RUN_HEADROOM = 64 * MIB
# Loader-owned data at the top of the slice's range (zero page, command line, ACPI tables) is
# placed on this boundary, so its e820 "reserved" entry starts and ends on it.
DATA_ALIGN = 64 * 1024


def align_up(x: int, a: int) -> int:
    """The least multiple of ``a`` that is >= ``x`` (``a`` > 0, not necessarily a power of 2)."""
    return (x + a - 1) // a * a


def align_down(x: int, a: int) -> int:
    """The greatest multiple of ``a`` that is <= ``x``."""
    return x // a * a
