"""Sizes and addresses as people write them (units.py)."""

import pytest

from coreslice.errors import UsageError
from coreslice.units import format_size, parse_memory, parse_size


def test_sizes_and_bases():
    assert parse_memory("1G@0x40000000") == (1 << 30, 0x40000000)
    assert parse_memory("512MiB") == (512 << 20, None)
    assert parse_size("010") == 10  # leading zeros are decimal, not an int(…, 0) error
    assert parse_size("0X1fM") == 0x1F << 20
    assert parse_size("16777215T") == (1 << 64) - (1 << 40)
    assert format_size(3 << 30) == "3G" and format_size(4097) == "4097"


@pytest.mark.parametrize("text, problem", [
    ("١G", "is not a size"),        # a non-ASCII digit: int() would take it
    ("²", "is not a size"),
    ("-1G", "is not a size"),
    ("1.5G", "is not a size"),
    ("16777216T", "is beyond the 64-bit physical address space"),
    (str(1 << 64), "is beyond the 64-bit physical address space"),
    ("9" * 5000, "'" + "9" * 40 + "...' is not a size"),  # no int() of 5000 digits, no 5000-digit message
])
def test_sizes_that_are_none(text, problem):
    with pytest.raises(UsageError, match=r"; write e\.g\. 512M") as e:
        parse_size(text, "memory size")
    assert problem in str(e.value) and len(str(e.value)) < 200
