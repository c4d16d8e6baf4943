"""The packed little-endian ctypes base that the boot-protocol layouts (boot/structs.py,
boot/lowmem.py) and the ACPI layouts (acpi/tables.py) are declared with.

Both formats are byte-exact little-endian records with no padding (x86 is little-endian; ACPI 6.5
§5.2 and bootparam.h declare their structures packed), and both parse bytes that came from outside
(a kernel file, the host's firmware tables), so truncation must be an error in the caller's own
terms: each family names its exception in ``format_error``.

The size is :meth:`sizeof`, not ``size()``: struct boot_e820_entry has a field called ``size``,
which would shadow a method of that name on exactly one class.
"""

from __future__ import annotations

import ctypes
from typing import ClassVar, TypeVar

from coreslice.errors import CoresliceError

U8, U16, U32, U64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

_S = TypeVar("_S", bound="PackedStruct")


class PackedStruct(ctypes.LittleEndianStructure):
    _pack_ = 1
    _layout_ = "ms"  # what _pack_ implies; Python >= 3.14 wants it spelled out

    # What parse raises for too few bytes; one exception type per format family.
    format_error: ClassVar[type[CoresliceError]] = CoresliceError

    @classmethod
    def sizeof(cls) -> int:
        return ctypes.sizeof(cls)

    @classmethod
    def parse(cls: type[_S], data: bytes | bytearray, offset: int = 0, what: str = "") -> _S:
        """A copy of the structure at ``offset`` of ``data``; ``format_error`` if it runs short."""
        if offset < 0 or len(data) - offset < ctypes.sizeof(cls):
            raise cls.format_error(
                f"{what or cls.__name__} at offset 0x{offset:x} is truncated: "
                f"needs {ctypes.sizeof(cls)} bytes, {max(len(data) - offset, 0)} left"
            )
        return cls.from_buffer_copy(data, offset)
