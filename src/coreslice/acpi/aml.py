"""A small AML encoder with ASL rendering (ACPI 6.5 §20, "ACPI Machine Language Specification").

There is no maintained Python library that writes AML, so this module encodes the few terms a
slice's DSDT needs: integers, strings, buffers, packages, Name, Scope, Device, Method/Return, EISA
IDs, and resource templates (§6.4) with the address-space descriptors of PCI root complexes.  Each
node renders both its AML bytes (``encode``) and readable ASL (``to_asl``); the tests compile the
ASL with iasl and require the same bytes, which keeps the two honest.  Encoding rules were checked
against QEMU's hw/acpi/aml-build.c and rust-vmm's acpi_tables.

Tables are ACPI 2.0+ (DefinitionBlock revision 2), so integers are 64-bit.
"""

from __future__ import annotations

import re
import struct
import textwrap
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Union

from coreslice.acpi import tables

# §20.2.3 Data Objects Encoding
ZERO_OP, ONE_OP, ONES_OP = 0x00, 0x01, 0xFF
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0E
STRING_PREFIX = 0x0D
# §20.2.2 Name Objects Encoding
ROOT_CHAR, PARENT_PREFIX = 0x5C, 0x5E
DUAL_NAME_PREFIX, MULTI_NAME_PREFIX, NULL_NAME = 0x2E, 0x2F, 0x00
# §20.2.5 Term Objects Encoding
NAME_OP = 0x08          # §20.2.5.1
SCOPE_OP = 0x10         # §20.2.5.1
METHOD_OP = 0x14        # §20.2.5.2
EXT_OP_PREFIX, DEVICE_OP = 0x5B, 0x82  # §20.2.5.2: DeviceOp is 0x5B 0x82
RETURN_OP = 0xA4        # §20.2.5.3
BUFFER_OP, PACKAGE_OP = 0x11, 0x12  # §20.2.5.4

ONES = (1 << 64) - 1    # Ones in a revision-2 table
DSDT_REVISION = 2       # 64-bit integers (§19.6.29, DefinitionBlock ComplianceRevision)


def pkg_length(body_len: int) -> bytes:
    """PkgLength for ``body_len`` bytes that follow it (§20.2.4).

    The encoded length counts the PkgLength bytes themselves.  One byte holds up to 63; longer
    forms put the byte count in bits 7-6 of the lead byte, the low nibble in bits 3-0, and the
    rest in the following bytes, least significant first.
    """
    for n, limit in ((1, 1 << 6), (2, 1 << 12), (3, 1 << 20), (4, 1 << 28)):
        total = body_len + n
        if total < limit:
            break
    else:
        raise ValueError(f"AML package of {body_len} bytes is too long for a PkgLength")
    if n == 1:
        return bytes([total])
    return bytes([(n - 1) << 6 | total & 0x0F]) + (total >> 4).to_bytes(n - 1, "little")


def _name_seg(seg: str) -> bytes:
    """NameSeg: 4 chars, lead [A-Z_], then [A-Z0-9_]; shorter names are padded with '_' (§20.2.2)."""
    if not 1 <= len(seg) <= 4 or not (seg[0].isupper() or seg[0] == "_") or not all(
        c.isascii() and (c.isupper() or c.isdigit() or c == "_") for c in seg
    ):
        raise ValueError(f"invalid ACPI name segment {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """NameString for an ASL path such as ``\\_SB.PCI0``, ``^FOO`` or ``C000`` (§20.2.2)."""
    prefix = b""
    if path.startswith("\\"):
        prefix, path = bytes([ROOT_CHAR]), path[1:]
    else:
        while path.startswith("^"):
            prefix, path = prefix + bytes([PARENT_PREFIX]), path[1:]
    segs = [_name_seg(s) for s in path.split(".")] if path else []
    if not segs:
        return prefix + bytes([NULL_NAME])
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise ValueError(f"ACPI path {path!r} has more than 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def _block(head: str, children: Iterable[Aml]) -> str:
    inner = "\n".join(c.to_asl() for c in children)
    body = textwrap.indent(inner, "    ") + "\n" if inner else ""
    return f"{head}\n{{\n{body}}}"


class Aml(ABC):
    """One AML term, encodable to bytes and printable as ASL."""

    @abstractmethod
    def encode(self) -> bytes: ...

    @abstractmethod
    def to_asl(self) -> str: ...


Value = Union["Aml", int, str, bytes, list]


def term(value: Value) -> Aml:
    """Wrap a Python value: int -> Integer, str -> String, bytes -> Buffer, list -> Package."""
    if isinstance(value, Aml):
        return value
    if isinstance(value, bool):
        raise TypeError("use 0 or 1, not a bool, for an AML integer")
    if isinstance(value, int):
        return Integer(value)
    if isinstance(value, str):
        return String(value)
    if isinstance(value, bytes):
        return Buffer(value)
    if isinstance(value, list):
        return Package(value)
    raise TypeError(f"no AML encoding for {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# Data objects (§20.2.3)

@dataclass(frozen=True)
class Integer(Aml):
    """An integer constant, in the smallest encoding: Zero/One/Ones, then Byte..QWord."""

    value: int

    def __post_init__(self) -> None:
        if not 0 <= self.value <= ONES:
            raise ValueError(f"AML integer {self.value} is outside 0..2**64-1")

    def _prefix(self) -> tuple[int, int]:
        """(prefix opcode, payload bytes)."""
        v = self.value
        if v in (0, 1, ONES):
            return {0: ZERO_OP, 1: ONE_OP, ONES: ONES_OP}[v], 0
        for prefix, size in ((BYTE_PREFIX, 1), (WORD_PREFIX, 2), (DWORD_PREFIX, 4)):
            if v < 1 << (8 * size):
                return prefix, size
        return QWORD_PREFIX, 8

    def encode(self) -> bytes:
        prefix, size = self._prefix()
        return bytes([prefix]) + (self.value.to_bytes(size, "little") if size else b"")

    def to_asl(self) -> str:
        prefix, size = self._prefix()
        if size == 0:
            return {ZERO_OP: "Zero", ONE_OP: "One", ONES_OP: "Ones"}[prefix]
        return f"0x{self.value:0{2 * size}X}"


class EisaId(Integer):
    """EISAID("PNP0A08"): three letters of 5 bits each, then 4 hex digits, stored big-endian (§19.6.35)."""

    text: str  # set in __init__; not a dataclass field, so equality stays by value

    def __init__(self, text: str) -> None:
        if not re.fullmatch("[A-Z]{3}[0-9A-F]{4}", text):
            raise ValueError(f"EISA ID {text!r} must be 3 upper-case letters and 4 upper-case hex digits")
        product = int(text[3:], 16)
        letters = [ord(c) - 0x40 for c in text[:3]]  # 'A' -> 1
        compressed = letters[0] << 26 | letters[1] << 21 | letters[2] << 16 | product
        super().__init__(int.from_bytes(compressed.to_bytes(4, "big"), "little"))
        object.__setattr__(self, "text", text)

    def to_asl(self) -> str:
        return f'EisaId ("{self.text}")'


@dataclass(frozen=True)
class String(Aml):
    value: str

    def __post_init__(self) -> None:
        if not self.value.isascii() or "\0" in self.value:
            raise ValueError(f"AML strings are ASCII without NUL: {self.value!r}")

    def encode(self) -> bytes:
        return bytes([STRING_PREFIX]) + self.value.encode("ascii") + b"\0"

    def to_asl(self) -> str:
        return '"' + self.value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Buffer(Aml):
    """DefBuffer: BufferOp PkgLength BufferSize ByteList (§20.2.5.4)."""

    data: bytes

    def encode(self) -> bytes:
        body = Integer(len(self.data)).encode() + self.data
        return bytes([BUFFER_OP]) + pkg_length(len(body)) + body

    def to_asl(self) -> str:
        rows = [", ".join(f"0x{b:02X}" for b in self.data[i : i + 8]) for i in range(0, len(self.data), 8)]
        inner = textwrap.indent(",\n".join(rows), "    ")
        return f"Buffer ({Integer(len(self.data)).to_asl()})\n{{\n{inner}\n}}" if rows else "Buffer (Zero) {}"


class Package(Aml):
    """DefPackage: PackageOp PkgLength NumElements PackageElementList (§20.2.5.4)."""

    def __init__(self, elements: Iterable[Value]) -> None:
        self.elements = [term(e) for e in elements]
        if len(self.elements) > 255:
            raise ValueError("a Package holds at most 255 elements (VarPackage is not implemented)")

    def encode(self) -> bytes:
        body = bytes([len(self.elements)]) + b"".join(e.encode() for e in self.elements)
        return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body

    def to_asl(self) -> str:
        inner = textwrap.indent(",\n".join(e.to_asl() for e in self.elements), "    ")
        return f"Package (0x{len(self.elements):02X})\n{{\n{inner}\n}}"


# ---------------------------------------------------------------------------------------------
# Named objects and statements (§20.2.5.1-3)

class Name(Aml):
    """DefName: NameOp NameString DataRefObject."""

    def __init__(self, name: str, value: Value) -> None:
        self.name, self.value = name, term(value)

    def encode(self) -> bytes:
        return bytes([NAME_OP]) + name_string(self.name) + self.value.encode()

    def to_asl(self) -> str:
        return f"Name ({self.name}, {self.value.to_asl()})"


class Scope(Aml):
    """DefScope: ScopeOp PkgLength NameString TermList."""

    _OPCODE = bytes([SCOPE_OP])
    _KEYWORD = "Scope"

    def __init__(self, name: str, *children: Aml) -> None:
        self.name, self.children = name, list(children)

    def encode(self) -> bytes:
        body = name_string(self.name) + b"".join(c.encode() for c in self.children)
        return self._OPCODE + pkg_length(len(body)) + body

    def to_asl(self) -> str:
        return _block(f"{self._KEYWORD} ({self.name})", self.children)


class Device(Scope):
    """DefDevice: DeviceOp PkgLength NameString TermList."""

    _OPCODE = bytes([EXT_OP_PREFIX, DEVICE_OP])
    _KEYWORD = "Device"


class Method(Aml):
    """DefMethod: MethodOp PkgLength NameString MethodFlags TermList.

    MethodFlags: bits 2-0 ArgCount, bit 3 SerializeFlag, bits 7-4 SyncLevel.
    """

    def __init__(self, name: str, *body: Aml, args: int = 0, serialized: bool = False) -> None:
        if not 0 <= args <= 7:
            raise ValueError(f"a method takes 0..7 arguments, not {args}")
        self.name, self.body, self.args, self.serialized = name, list(body), args, serialized

    def encode(self) -> bytes:
        flags = self.args | (1 << 3 if self.serialized else 0)
        body = name_string(self.name) + bytes([flags]) + b"".join(t.encode() for t in self.body)
        return bytes([METHOD_OP]) + pkg_length(len(body)) + body

    def to_asl(self) -> str:
        serial = "Serialized" if self.serialized else "NotSerialized"
        return _block(f"Method ({self.name}, {self.args}, {serial})", self.body)


class Return(Aml):
    """DefReturn: ReturnOp ArgObject."""

    def __init__(self, value: Value) -> None:
        self.value = term(value)

    def encode(self) -> bytes:
        return bytes([RETURN_OP]) + self.value.encode()

    def to_asl(self) -> str:
        return f"Return ({self.value.to_asl()})"


class DefinitionBlock(Aml):
    """A complete definition block (DSDT/SSDT): table header (§5.2.6) followed by the AML."""

    def __init__(self, signature: str, *children: Aml) -> None:
        self.signature, self.children = signature, list(children)

    def encode(self) -> bytes:
        header = tables.new_header(self.signature.encode("ascii"), DSDT_REVISION)
        return tables.seal(bytes(header) + b"".join(c.encode() for c in self.children))

    def to_asl(self) -> str:
        head = (
            f'DefinitionBlock ("", "{self.signature}", {DSDT_REVISION}, "{tables.OEM_ID.decode()}", '
            f'"{tables.OEM_TABLE_ID.decode()}", 0x{tables.OEM_REVISION:08X})'
        )
        return _block(head, self.children) + "\n"


# ---------------------------------------------------------------------------------------------
# Resource templates (§6.4): a Buffer of resource descriptors closed by an End Tag.

END_TAG = bytes([0x79, 0x00])  # small item 0xF, length 1 (§6.4.2.9); checksum 0 means "valid"

# Address-space descriptors (§6.4.3.5): large item tag, Resource Type, flags.
_WORD_TAG, _DWORD_TAG, _QWORD_TAG = 0x88, 0x87, 0x8A  # §6.4.3.5.3, .2, .1
_TYPE_MEMORY, _TYPE_IO, _TYPE_BUS = 0, 1, 2
# General flags (§6.4.3.5.1): bit 0 consumer (iasl sets it for ResourceConsumer), bit 1 _DEC
# (subtractive decode; never set here), bit 2 _MIF, bit 3 _MAF.
_GF_CONSUMER, _GF_MIN_FIXED, _GF_MAX_FIXED = 1 << 0, 1 << 2, 1 << 3


class Caching(Enum):
    """Memory type-specific flags bits 2-1, _MEM (§6.4.3.5.4)."""

    NON_CACHEABLE = (0, "NonCacheable")
    CACHEABLE = (1, "Cacheable")
    WRITE_COMBINING = (2, "WriteCombining")
    PREFETCHABLE = (3, "Prefetchable")


@dataclass(frozen=True)
class AddressSpace(Aml):
    """Word/DWord/QWord Address Space Descriptor with a fixed window [minimum, maximum].

    Only the fixed-size, fixed-location form is built (_MIF = _MAF = 1, _GRA = 0,
    _LEN = _MAX - _MIN + 1; §6.4.3.5, "Valid Combination of Address Space Descriptor Fields"), which
    is what a PCI root complex's windows are.  No ResourceSource is appended.
    """

    minimum: int
    maximum: int
    translation: int = 0
    producer: bool = True

    _TAG = 0
    _WIDTH = 0          # bytes per address field
    _RESOURCE_TYPE = 0
    _KEYWORD = ""

    def __post_init__(self) -> None:
        top = (1 << (8 * self._WIDTH)) - 1
        window = f"{self._KEYWORD} window {self.minimum:#x}-{self.maximum:#x}"
        if not 0 <= self.minimum <= self.maximum <= top or not 0 <= self.translation <= top:
            raise ValueError(f"{window} does not fit {self._WIDTH}-byte fields")
        if self.length > top:
            raise ValueError(f"{window} is too long for its {self._WIDTH}-byte Length field")

    @property
    def length(self) -> int:
        return self.maximum - self.minimum + 1

    def _type_flags(self) -> int:
        return 0

    def encode(self) -> bytes:
        general = _GF_MIN_FIXED | _GF_MAX_FIXED | (0 if self.producer else _GF_CONSUMER)
        values = (0, self.minimum, self.maximum, self.translation, self.length)
        width = {2: "H", 4: "I", 8: "Q"}[self._WIDTH]
        body = struct.pack(f"<BBB5{width}", self._RESOURCE_TYPE, general, self._type_flags(), *values)
        return struct.pack("<BH", self._TAG, len(body)) + body

    def _asl_head(self) -> str:
        raise NotImplementedError

    # The optional arguments after Length, left empty except for type-specific keywords.
    _ASL_TAIL = ",, "

    def to_asl(self) -> str:
        rows = [
            (0, "Granularity"),
            (self.minimum, "Range Minimum"),
            (self.maximum, "Range Maximum"),
            (self.translation, "Translation Offset"),
            (self.length, "Length"),
        ]
        lines = [f"    0x{v:0{2 * self._WIDTH}X},".ljust(24) + f"// {what}" for v, what in rows]
        return f"{self._KEYWORD} ({self._asl_head()},\n" + "\n".join(lines) + f"\n    {self._ASL_TAIL})"

    def _usage(self) -> str:
        return "ResourceProducer" if self.producer else "ResourceConsumer"


@dataclass(frozen=True)
class WordBusNumber(AddressSpace):
    _TAG, _WIDTH, _RESOURCE_TYPE, _KEYWORD = _WORD_TAG, 2, _TYPE_BUS, "WordBusNumber"

    def _asl_head(self) -> str:
        return f"{self._usage()}, MinFixed, MaxFixed, PosDecode"


@dataclass(frozen=True)
class WordIO(AddressSpace):
    """I/O window; type-specific flags (§6.4.3.5.5): _RNG = 3 (EntireRange), TypeStatic, dense."""

    _TAG, _WIDTH, _RESOURCE_TYPE, _KEYWORD = _WORD_TAG, 2, _TYPE_IO, "WordIO"

    def _type_flags(self) -> int:
        return 0b11

    def _asl_head(self) -> str:
        return f"{self._usage()}, MinFixed, MaxFixed, PosDecode, EntireRange"

    _ASL_TAIL = ",, , TypeStatic, DenseTranslation"


@dataclass(frozen=True)
class DWordMemory(AddressSpace):
    """Memory window; type-specific flags (§6.4.3.5.4): _RW, _MEM, _MTP = AddressRangeMemory, TypeStatic."""

    caching: Caching = Caching.NON_CACHEABLE
    read_write: bool = True

    _TAG, _WIDTH, _RESOURCE_TYPE, _KEYWORD = _DWORD_TAG, 4, _TYPE_MEMORY, "DWordMemory"

    def _type_flags(self) -> int:
        return self.caching.value[0] << 1 | (1 if self.read_write else 0)

    def _asl_head(self) -> str:
        rw = "ReadWrite" if self.read_write else "ReadOnly"
        return f"{self._usage()}, PosDecode, MinFixed, MaxFixed, {self.caching.value[1]}, {rw}"

    _ASL_TAIL = ",, , AddressRangeMemory, TypeStatic"


@dataclass(frozen=True)
class QWordMemory(DWordMemory):
    _TAG, _WIDTH, _KEYWORD = _QWORD_TAG, 8, "QWordMemory"


class ResourceTemplate(Aml):
    """ResourceTemplate () { ... }: a Buffer of descriptors plus the End Tag (§6.4, §19.3.3)."""

    def __init__(self, *descriptors: AddressSpace) -> None:
        self.descriptors = list(descriptors)

    def encode(self) -> bytes:
        return Buffer(b"".join(d.encode() for d in self.descriptors) + END_TAG).encode()

    def to_asl(self) -> str:
        return _block("ResourceTemplate ()", self.descriptors)
