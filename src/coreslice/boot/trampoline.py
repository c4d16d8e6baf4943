"""The SIPI trampoline: real mode -> protected mode -> long mode -> the kernel's 64-bit entry.

A parked core woken with INIT-SIPI-SIPI starts in real mode at CS = vector << 8 (segment base
vector << 12), IP = 0, with interrupts off and CR0 = 0x60000010 after power-up (CD and NW set:
caches disabled); INIT leaves CD and NW as they were (SDM Vol. 3A §9.1.1 Table 9-1), so the code
clears both whatever it finds. This page takes it to the state the Linux x86 boot protocol asks for at the 64-bit
entry (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"): long mode with paging, the loaded
kernel, zero page and command line identity mapped, a GDT with __BOOT_CS (0x10, 64-bit code) and
__BOOT_DS (0x18, flat data), CS = __BOOT_CS, DS/ES/SS = __BOOT_DS, interrupts disabled, RSI = the
zero page (struct boot_params); the entry is the kernel's load address + 0x200.

The machine code is written below as tables of ``(bytes, NASM/Intel text)``; unit tests decode the
bytes with iced-x86 and check the text. Only fields that depend on the arguments are computed:
  - absolute (linear) addresses from ``base``: the GDT base in the GDTR and both far-jump targets,
    so the page works at any SIPI vector;
  - immediates: ``cr3``, ``boot_params``, ``entry``.
Nothing here uses a stack.  The code writes memory twice, and only in its own page: the wake
handshake (``HANDSHAKE_OFFSET``), a word set as the first instruction after DS = CS and another
just before the jump to the kernel, so the loader can tell "the CPU never woke" from "it woke
but never reached the kernel" from "it is in the kernel".  Everything else stays as loaded (the
GDT's Accessed bits are preset so the CPU has nothing to set there).

Page layout (offsets in the page)::

    0x000  16-bit code | 32-bit code | 64-bit code | GDT, GDTR, IDTR (8-aligned)
    ...    zeros
    0xEF0  HANDSHAKE_OFFSET: u32 ENTERED, u32 IN_KERNEL, written by the CPU (zero as loaded)
    0xF00  RECORD_OFFSET: RECORD_SIZE bytes for the loader (see below); never touched by the code

Requirement on the caller: the page tables at ``cr3`` must identity-map this page, because the
instruction after ``mov cr0, eax`` (paging on) is fetched through them (SDM §9.8.5).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from coreslice.boot.layout import MIB, PAGE, align_up
from coreslice.errors import UsageError

REAL_MODE_LIMIT = MIB  # the SIPI vector is 8 bits: start page is below 1 MiB
CANONICAL_LIMIT = 1 << 47  # entry/boot_params are identity mapped: lower canonical half only

# The loader's record: which slice owns this trampoline (e.g. an 8-byte magic, then its data).
# Its format belongs to the loader; this module only guarantees the code and data never reach it
# and that ``build_trampoline`` returns bytes that end before it.
RECORD_OFFSET = 0xF00
RECORD_SIZE = 0x100

# The wake handshake: two 32-bit words the woken CPU sets (its only writes), zero as loaded.
HANDSHAKE_OFFSET = 0xEF0
HANDSHAKE_SIZE = 8
ENTERED_MAGIC = 0x43534531    # "1ESC" little endian: the CPU executes the trampoline
IN_KERNEL_MAGIC = 0x43534B32  # "2KSC": the CPU is about to jump to the kernel's 64-bit entry

# GDT selectors. 0x10 and 0x18 are fixed by the Linux boot protocol (__BOOT_CS, __BOOT_DS).
CODE32_SEL = 0x08  # 32-bit code, used only between CR0.PE and CR0.PG
BOOT_CS = 0x10  # 64-bit code: CS at the kernel entry
BOOT_DS = 0x18  # flat read/write data: DS, ES, SS (and FS, GS) at the kernel entry

# Control-register and MSR bits (SDM Vol. 3A §2.5 "Control Registers", §2.2.1 "Extended Feature
# Enable Register").
CR0_PE = 1 << 0  # protection enable
CR0_NW = 1 << 29  # not write-through  } both set after INIT: clear them so the kernel runs
CR0_CD = 1 << 30  # cache disable      } with caches on (Linux's own trampoline does the same)
CR0_PG = 1 << 31  # paging
CR0_KEEP = ~(CR0_CD | CR0_NW) & 0xFFFF_FFFF  # AND mask: everything but CD and NW
CR4_PAE = 1 << 5  # physical address extension, required for IA-32e paging
MSR_EFER = 0xC000_0080
EFER_LME = 1 << 8  # long mode enable; the CPU sets EFER.LMA (bit 10) when CR0.PG is set


def segment_descriptor(*, access: int, flags: int, base: int = 0, limit: int = 0xF_FFFF) -> int:
    """An 8-byte code/data segment descriptor (SDM Vol. 3A §3.4.5, Figure 3-8).

    ``access`` is bits 40-47 (P, DPL, S, type); ``flags`` is bits 52-55 (AVL, L, D/B, G).
    """
    return (
        (limit & 0xFFFF)
        | (base & 0xFF_FFFF) << 16
        | (access & 0xFF) << 40
        | (limit >> 16 & 0xF) << 48
        | (flags & 0xF) << 52
        | (base >> 24 & 0xFF) << 56
    )


# access: P=1, DPL=0, S=1 (code/data), then type (SDM §3.4.5.1 Table 3-1); Accessed preset.
ACCESS_CODE = 0x9B  # execute/read, accessed
ACCESS_DATA = 0x93  # read/write, accessed
# flags: G=1 (4 KiB granularity, so limit 0xFFFFF = 4 GiB) plus D/B=1 (32-bit) or L=1 (64-bit,
# then D must be 0: SDM §5.2.1 "Code-Segment Descriptors in 64-bit Mode").
FLAGS_32 = 0xC  # G | D/B
FLAGS_64 = 0xA  # G | L

GDT: tuple[tuple[int, int, str], ...] = (
    # (selector, descriptor, what it is)
    (0x00, 0, "null descriptor"),
    (CODE32_SEL, segment_descriptor(access=ACCESS_CODE, flags=FLAGS_32), "32-bit flat code"),
    (BOOT_CS, segment_descriptor(access=ACCESS_CODE, flags=FLAGS_64), "__BOOT_CS: 64-bit code"),
    (BOOT_DS, segment_descriptor(access=ACCESS_DATA, flags=FLAGS_32), "__BOOT_DS: flat data"),
)


class Insn(NamedTuple):
    """One instruction (or data item): its bytes and the text they disassemble to."""

    code: bytes
    text: str
    note: str = ""


@dataclass(frozen=True)
class Block:
    """Consecutive items at ``offset`` in the page; ``bits`` is 16/32/64, or 0 for data."""

    name: str
    bits: int
    offset: int
    items: tuple[Insn, ...]

    @property
    def size(self) -> int:
        return sum(len(i.code) for i in self.items)


@dataclass(frozen=True)
class _Symbols:
    """Where things are: offsets in the page, linear addresses (page base + offset)."""

    base: int
    code16: int
    code32: int
    code64: int
    gdt: int
    gdtr: int
    idtr: int


def _u16(v: int) -> bytes:
    return struct.pack("<H", v)


def _u32(v: int) -> bytes:
    return struct.pack("<I", v)


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def _h(s: str) -> bytes:
    return bytes.fromhex(s)


def _real_mode(s: _Symbols, cr3: int, entry: int, boot_params: int) -> list[Insn]:
    # SDM §9.9.1 "Switching to Protected Mode", done as in Linux's realmode/rm/trampoline_64.S.
    # Real-mode memory operands are DS-relative, so [off] is an offset within this page once DS=CS.
    return [
        Insn(_h("fa"), "cli", "§9.9.1 step 1; boot protocol: interrupts disabled"),
        # boot.rst does not require DF = 0 at entry, but the kernel's C code assumes it.
        Insn(_h("fc"), "cld", "string operations count up (EFLAGS.DF = 0)"),
        Insn(_h("8cc8"), "mov ax, cs", "CS = SIPI vector << 8"),
        Insn(_h("8ed8"), "mov ds, ax", "so [off] addresses this page"),
        Insn(_h("66c706") + _u16(HANDSHAKE_OFFSET) + _u32(ENTERED_MAGIC),
             f"mov dword [{HANDSHAKE_OFFSET:#x}], {ENTERED_MAGIC:#x}", "handshake: the CPU woke"),
        # o32: load a full 32-bit base (SDM LGDT/LIDT: a 16-bit operand would use 24 bits).
        Insn(_h("660f0116") + _u16(s.gdtr), f"o32 lgdt [{s.gdtr:#x}]", "§9.9.1 step 2"),
        # A null IDT: until the kernel loads its own, an NMI or fault shuts the core down rather
        # than vectoring through the real-mode IVT read as a protected-mode IDT.
        Insn(_h("660f011e") + _u16(s.idtr), f"o32 lidt [{s.idtr:#x}]", "§9.9.1 step 9, limit 0"),
        Insn(_h("0f20c0"), "mov eax, cr0"),
        Insn(_h("6625") + _u32(CR0_KEEP), f"and eax, {CR0_KEEP:#x}", "caches on: clear CD, NW"),
        Insn(_h("6683c8") + bytes([CR0_PE]), f"or eax, {CR0_PE}", "CR0.PE"),
        Insn(_h("0f22c0"), "mov cr0, eax", "§9.9.1 step 3: protected mode"),
        # Step 4: a far jump right after MOV CR0 loads CS from the GDT and flushes the prefetched
        # real-mode instructions. o32 (ptr16:32) because the target may be above 64 KiB.
        Insn(_h("66ea") + _u32(s.base + s.code32) + _u16(CODE32_SEL),
             f"jmp dword {CODE32_SEL:#x}:{s.base + s.code32:#x}", "§9.9.1 step 4"),
    ]


def _protected_mode(s: _Symbols, cr3: int, entry: int, boot_params: int) -> list[Insn]:
    # SDM §9.8.5 "Initializing IA-32e Mode": from protected mode with paging off, enable PAE,
    # load CR3, set EFER.LME, then set CR0.PG (the CPU then sets EFER.LMA: compatibility mode).
    return [
        Insn(_h("b8") + _u32(BOOT_DS), f"mov eax, {BOOT_DS:#x}", "__BOOT_DS"),
        Insn(_h("8ed8"), "mov ds, eax", "§9.9.1 step 8: reload data segments"),
        Insn(_h("8ec0"), "mov es, eax"),
        Insn(_h("8ed0"), "mov ss, eax"),
        Insn(_h("8ee0"), "mov fs, eax"),
        Insn(_h("8ee8"), "mov gs, eax"),
        Insn(_h("0f20e0"), "mov eax, cr4"),
        Insn(_h("83c8") + bytes([CR4_PAE]), f"or eax, {CR4_PAE:#x}", "§9.8.5 step 2: CR4.PAE"),
        Insn(_h("0f22e0"), "mov cr4, eax"),
        Insn(_h("b8") + _u32(cr3), f"mov eax, {cr3:#x}", "PML4 (below 4 GiB: 32-bit CR3 load)"),
        Insn(_h("0f22d8"), "mov cr3, eax", "§9.8.5 step 3"),
        Insn(_h("b9") + _u32(MSR_EFER), f"mov ecx, {MSR_EFER:#x}", "IA32_EFER"),
        Insn(_h("0f32"), "rdmsr"),
        Insn(_h("0d") + _u32(EFER_LME), f"or eax, {EFER_LME:#x}", "§9.8.5 step 4: EFER.LME"),
        Insn(_h("0f30"), "wrmsr"),
        Insn(_h("0f20c0"), "mov eax, cr0"),
        Insn(_h("0d") + _u32(CR0_PG), f"or eax, {CR0_PG:#x}", "CR0.PG"),
        Insn(_h("0f22c0"), "mov cr0, eax", "§9.8.5 step 5: IA-32e mode (compatibility)"),
        # A far jump to a code segment with L=1 enters 64-bit mode (SDM §9.8.5, §5.2.1).
        Insn(_h("ea") + _u32(s.base + s.code64) + _u16(BOOT_CS),
             f"jmp {BOOT_CS:#x}:{s.base + s.code64:#x}", "CS = __BOOT_CS: 64-bit mode"),
    ]


def _long_mode(s: _Symbols, cr3: int, entry: int, boot_params: int) -> list[Insn]:
    # boot.rst "64-bit Boot Protocol": %rsi holds the base address of struct boot_params.
    # Both may be above 4 GiB, hence the 64-bit immediates.
    return [
        Insn(_h("48be") + _u64(boot_params), f"mov rsi, {boot_params:#x}", "struct boot_params"),
        Insn(_h("48b8") + _u64(entry), f"mov rax, {entry:#x}", "kernel load address + 0x200"),
        # A 32-bit absolute address (ModRM 04, SIB 25): the page is below 1 MiB, identity mapped.
        Insn(_h("c70425") + _u32(s.base + HANDSHAKE_OFFSET + 4) + _u32(IN_KERNEL_MAGIC),
             f"mov dword [{s.base + HANDSHAKE_OFFSET + 4:#x}], {IN_KERNEL_MAGIC:#x}",
             "handshake: into the kernel"),
        Insn(_h("ffe0"), "jmp rax"),
    ]


def _data(s: _Symbols, cr3: int, entry: int, boot_params: int) -> list[Insn]:
    gdt = [Insn(_u64(d), f"dq {d:#018x}", f"GDT {sel:#04x}: {what}") for sel, d, what in GDT]
    limit = 8 * len(GDT) - 1
    return [
        *gdt,
        # Pseudo-descriptors for LGDT/LIDT (SDM §3.5.1 Figure 3-11): 16-bit limit, 32-bit base.
        Insn(_u16(limit), f"dw {limit:#x}", "GDTR limit"),
        Insn(_u32(s.base + s.gdt), f"dd {s.base + s.gdt:#x}", "GDTR base (linear)"),
        Insn(_u16(0), "dw 0x0", "IDTR limit: empty IDT"),
        Insn(_u32(0), "dd 0x0", "IDTR base"),
    ]


_Builder = Callable[[_Symbols, int, int, int], list[Insn]]
# (name, bitness, the _Symbols field holding its offset, builder), in page order
_BLOCKS: tuple[tuple[str, int, str, _Builder], ...] = (
    ("real mode", 16, "code16", _real_mode),
    ("protected mode", 32, "code32", _protected_mode),
    ("long mode", 64, "code64", _long_mode),
    ("data", 0, "gdt", _data),
)


def _size(build: _Builder) -> int:
    # Every field has a fixed width, so sizes do not depend on the values (a two-pass assembler).
    return sum(len(i.code) for i in build(_Symbols(0, 0, 0, 0, 0, 0, 0), 0, 0, 0))


def _layout(base: int) -> _Symbols:
    code16 = 0  # IP = 0 after the SIPI
    code32 = code16 + _size(_real_mode)
    code64 = code32 + _size(_protected_mode)
    gdt = align_up(code64 + _size(_long_mode), 8)  # descriptors 8-aligned (SDM §3.5.1)
    gdtr = gdt + 8 * len(GDT)
    idtr = gdtr + 6
    return _Symbols(base, code16=code16, code32=code32, code64=code64, gdt=gdt, gdtr=gdtr,
                    idtr=idtr)


def _validate(base: int, cr3: int, entry: int, boot_params: int) -> None:
    if not 0 <= base < REAL_MODE_LIMIT or base % PAGE:
        raise UsageError(
            f"trampoline base {base:#x} is not a 4 KiB-aligned page below 1 MiB: the SIPI vector "
            "is base >> 12 (8 bits); pick a free page-aligned address below 0x100000"
        )
    if not 0 <= cr3 < 1 << 32 or cr3 % PAGE:
        raise UsageError(
            f"page tables at {cr3:#x} are not a 4 KiB-aligned address below 4 GiB: CR3 is loaded "
            "from 32-bit protected mode; place the page tables below 0x100000000"
        )
    for name, value, what in (
        ("entry", entry, "the kernel's load address + 0x200"),
        ("boot_params", boot_params, "the zero page's address"),
    ):
        if not 0 < value < CANONICAL_LIMIT:
            raise UsageError(
                f"{name} {value:#x} is not a non-zero address below {CANONICAL_LIMIT:#x} (it is "
                f"reached through identity-mapped 4-level paging); pass {what}"
            )


def trampoline_blocks(base: int, *, cr3: int, entry: int, boot_params: int) -> list[Block]:
    """The trampoline as blocks of ``Insn`` with their offsets: what the tests and listing read."""
    _validate(base, cr3, entry, boot_params)
    sym = _layout(base)
    blocks = [
        Block(name, bits, getattr(sym, at), tuple(build(sym, cr3, entry, boot_params)))
        for name, bits, at, build in _BLOCKS
    ]
    end = blocks[-1].offset + blocks[-1].size
    assert end <= HANDSHAKE_OFFSET, f"trampoline ({end:#x} bytes) overlaps the handshake words"
    return blocks


def build_trampoline(base: int, *, cr3: int, entry: int, boot_params: int) -> bytes:
    """The trampoline bytes to write at physical ``base`` (SIPI vector ``base >> 12``).

    The result starts at offset 0 of the page and ends with the (zeroed) handshake words, before
    ``RECORD_OFFSET``: writing it clears what an earlier wake left there, and the rest of the
    page is free for the loader's record.
    """
    page = bytearray()
    for block in trampoline_blocks(base, cr3=cr3, entry=entry, boot_params=boot_params):
        page += bytes(block.offset - len(page))  # alignment padding (zeros) before the block
        for insn in block.items:
            page += insn.code
    return bytes(page.ljust(HANDSHAKE_OFFSET + HANDSHAKE_SIZE, b"\0"))


def handshake(raw: bytes) -> str:
    """What the handshake words (8 bytes read at base + HANDSHAKE_OFFSET) say: "none" (the CPU
    never ran the trampoline), "entered" (it did, but has not reached the kernel) or "kernel"."""
    entered, in_kernel = struct.unpack("<II", raw[:HANDSHAKE_SIZE])
    if in_kernel == IN_KERNEL_MAGIC:
        return "kernel"
    return "entered" if entered == ENTERED_MAGIC else "none"


def trampoline_listing(base: int, *, cr3: int, entry: int, boot_params: int) -> str:
    """An annotated listing: page offset, hex bytes, instruction text, note."""
    blocks = trampoline_blocks(base, cr3=cr3, entry=entry, boot_params=boot_params)
    lines = [
        f"; coreslice trampoline at {base:#x} (SIPI vector {base >> 12:#04x})",
        f"; cr3={cr3:#x} entry={entry:#x} boot_params={boot_params:#x}",
    ]
    for block in blocks:
        kind = f"{block.bits}-bit code" if block.bits else "GDT and pseudo-descriptors"
        lines.append(f"\n; {block.name} ({kind})")
        offset = block.offset
        for insn in block.items:
            note = f"  ; {insn.note}" if insn.note else ""
            lines.append(f"{offset:04x}  {insn.code.hex(' '):<30} {insn.text}{note}".rstrip())
            offset += len(insn.code)
    lines.append(f"\n{HANDSHAKE_OFFSET:04x}  ; handshake words, {HANDSHAKE_SIZE} bytes (written by the CPU)")
    lines.append(f"{RECORD_OFFSET:04x}  ; loader record, {RECORD_SIZE:#x} bytes (not code)")
    return "\n".join(lines) + "\n"
