"""The SIPI trampoline: its text matches its bytes (iced-x86), and it really reaches the kernel
entry in long mode (unicorn, starting in real mode with the SIPI's CS)."""

import re
import struct

import iced_x86
import pytest
from unicorn import UC_ARCH_X86, UC_HOOK_CODE, UC_HOOK_INTR, UC_MODE_16, Uc
from unicorn import x86_const as r

from coreslice.boot.pagetables import build_identity_page_tables
from coreslice.boot.trampoline import (
    HANDSHAKE_OFFSET,
    HANDSHAKE_SIZE,
    handshake,
    RECORD_OFFSET,
    RECORD_SIZE,
    build_trampoline,
    trampoline_blocks,
    trampoline_listing,
)
from coreslice.errors import UsageError

CR3 = 0x10_0000
ENTRY = 0x1_0100_0200  # kernel loaded at 0x1_0100_0000, above 4 GiB
BOOT_PARAMS = 0x1_0000_0000
RANGES = [(0x0, 0x20_0000), (0x1_0000_0000, 0x1_0200_0000)]
ARGS = dict(cr3=CR3, entry=ENTRY, boot_params=BOOT_PARAMS)
BASES = [0x7000, 0x20000, 0x9F000, 0x1000]
CR0_AFTER_RESET = 0x6000_0010  # SDM Vol. 3A Table 9-1: CD | NW | ET


# --- the text cannot lie about the bytes -------------------------------------------------------

def _formatter() -> iced_x86.Formatter:
    f = iced_x86.Formatter(iced_x86.FormatterSyntax.NASM)
    f.hex_prefix, f.hex_suffix, f.uppercase_hex = "0x", "", False
    f.space_after_operand_separator = True
    return f


def normalise(text: str) -> str:
    """Lower case, single spaces, no space after commas, every number as decimal."""
    text = re.sub(r"\s+", " ", text.strip().lower()).replace(", ", ",")
    return re.sub(r"\b0x[0-9a-f]+\b|\b[0-9]+\b", lambda m: str(int(m.group(0), 0)), text)


@pytest.mark.parametrize("base", BASES)
def test_each_instruction_text_matches_its_bytes(base):
    blocks = trampoline_blocks(base, **ARGS)
    fmt = _formatter()
    code_blocks = [b for b in blocks if b.bits]
    assert [b.bits for b in code_blocks] == [16, 32, 64]
    for block in code_blocks:
        data = b"".join(i.code for i in block.items)
        decoder = iced_x86.Decoder(block.bits, data, ip=base + block.offset)
        decoded = list(decoder)
        assert len(decoded) == len(block.items), block.name
        for insn, dec in zip(block.items, decoded):
            assert not dec.is_invalid, insn
            assert dec.len == len(insn.code), f"{insn.text}: boundary mismatch"
            assert normalise(fmt.format(dec)) == normalise(insn.text), insn.code.hex()


@pytest.mark.parametrize("base", BASES)
def test_data_text_matches_its_bytes(base):
    (data,) = [b for b in trampoline_blocks(base, **ARGS) if not b.bits]
    fmt = {"db": "<B", "dw": "<H", "dd": "<I", "dq": "<Q"}
    for item in data.items:
        op, value = item.text.split()
        assert item.code == struct.pack(fmt[op], int(value, 0)), item.text


def test_normalise():
    assert normalise("JMP  DWORD 8:0x0002002A") == normalise("jmp dword 0x8:0x2002a")
    assert normalise("mov ax,cs") == "mov ax,cs"
    assert normalise("mov eax, cr0") != normalise("mov eax, cr4")


def test_layout_code_before_the_record_area():
    blocks = trampoline_blocks(0x20000, **ARGS)
    code = build_trampoline(0x20000, **ARGS)
    assert RECORD_OFFSET + RECORD_SIZE <= 0x1000
    assert len(code) <= RECORD_OFFSET
    assert blocks[-1].offset + blocks[-1].size <= HANDSHAKE_OFFSET
    assert len(code) == HANDSHAKE_OFFSET + HANDSHAKE_SIZE
    for block in blocks:
        at = block.offset
        assert code[at:at + block.size] == b"".join(i.code for i in block.items)
    offsets = [b.offset for b in blocks]
    assert offsets == sorted(offsets) and offsets[0] == 0
    (data,) = [b for b in blocks if not b.bits]
    assert data.offset % 8 == 0  # the GDT is 8-aligned


def test_listing_shows_every_item():
    listing = trampoline_listing(0x20000, **ARGS)
    for block in trampoline_blocks(0x20000, **ARGS):
        at = block.offset
        for insn in block.items:
            line = rf"^{at:04x}  {insn.code.hex(' ')} +{re.escape(insn.text)}"
            assert re.search(line, listing, re.M), insn.text
            at += len(insn.code)
    assert f"{RECORD_OFFSET:04x}" in listing
    assert "lgdt" in listing and "jmp rax" in listing


def test_only_base_dependent_fields_change_with_the_base():
    a = build_trampoline(0x7000, **ARGS)
    b = build_trampoline(0x20000, **ARGS)
    assert len(a) == len(b)
    diff = [i for i in range(len(a)) if a[i] != b[i]]
    patched = set()
    for block in trampoline_blocks(0x7000, **ARGS):
        at = block.offset
        for insn in block.items:
            if insn.text.startswith(("jmp dword", "jmp 0x")) or "GDTR base" in insn.note or "into the kernel" in insn.note:
                patched.update(range(at, at + len(insn.code)))
            at += len(insn.code)
    assert diff and set(diff) <= patched


# --- execution: real mode -> long mode in unicorn ----------------------------------------------

def _stub(out: int, probes: list[int]) -> bytes:
    """64-bit code put at ENTRY: stores RIP, RSI and a load from each probe address at ``out``."""
    code = bytes.fromhex("488d05f9ffffff")  # lea rax, [rip-7]: RIP of this instruction
    code += bytes.fromhex("48a3") + struct.pack("<Q", out)  # mov [out], rax
    code += bytes.fromhex("4889f0")  # mov rax, rsi
    code += bytes.fromhex("48a3") + struct.pack("<Q", out + 8)
    for i, va in enumerate(probes):
        code += bytes.fromhex("48a1") + struct.pack("<Q", va)  # mov rax, [va]
        code += bytes.fromhex("48a3") + struct.pack("<Q", out + 16 + 8 * i)
    return code + b"\xf4"  # hlt


class Machine:
    """Low 2 MiB and 32 MiB at 4 GiB of 'RAM', the trampoline and page tables loaded."""

    def __init__(self, base: int, stub: bytes, *, cr3: int = CR3, ranges=RANGES):
        self.base = base
        self.uc = uc = Uc(UC_ARCH_X86, UC_MODE_16)
        uc.mem_map(0x0, 0x20_0000)
        uc.mem_map(0x1_0000_0000, 0x200_0000)
        uc.mem_map(0x4000_0000, 0x20_0000)  # backed, but left out of the page tables
        self.code = build_trampoline(base, cr3=cr3, entry=ENTRY, boot_params=BOOT_PARAMS)
        uc.mem_write(base, self.code)
        uc.mem_write(cr3, build_identity_page_tables(cr3, ranges))
        uc.mem_write(ENTRY, stub)
        self.stub_end = ENTRY + len(stub) - 1  # the hlt
        self.trace: list[int] = []
        self.interrupts: list[int] = []
        uc.hook_add(UC_HOOK_CODE, lambda u, addr, size, _: self.trace.append(addr))
        uc.hook_add(UC_HOOK_INTR, self._interrupt)

    def _interrupt(self, uc, intno, _):
        self.interrupts.append(intno)
        uc.emu_stop()

    def _init_state(self) -> None:
        """The core's state after INIT, as far as unicorn can set it (SDM Vol. 3A §9.1.1, Table
        9-1, "IA-32 and Intel 64 Processor States Following Power-up, Reset, or INIT").

        unicorn starts with CR0 = 0, which would let a trampoline that never clears CD and NW
        pass.  After power-up CR0 is 0x60000010 (CD, NW, ET); INIT leaves CD and NW as they
        were, so a parked core may well have both set: we start from that worst case.
        Not settable here: the hidden segment limits and access rights (unicorn derives a
        real-mode segment from its selector alone), the caches themselves (TCG models none, so
        only the CD/NW bits can be checked), MTRRs, PAT, the local APIC, and x87/SSE state.
        """
        uc = self.uc
        uc.reg_write(r.UC_X86_REG_CR0, CR0_AFTER_RESET)
        for reg in (r.UC_X86_REG_CR2, r.UC_X86_REG_CR3, r.UC_X86_REG_CR4):
            uc.reg_write(reg, 0)
        uc.msr_write(0xC000_0080, 0)  # IA32_EFER
        for reg in (r.UC_X86_REG_GDTR, r.UC_X86_REG_IDTR):
            uc.reg_write(reg, (0, 0, 0xFFFF, 0))  # base 0, limit 0xFFFF
        for reg in (r.UC_X86_REG_DS, r.UC_X86_REG_ES, r.UC_X86_REG_FS, r.UC_X86_REG_GS, r.UC_X86_REG_SS):
            uc.reg_write(reg, 0)
        uc.reg_write(r.UC_X86_REG_DR7, 0x400)
        # SIPI semantics (SDM Vol. 3A §9.4): CS selector = vector << 8, so the real-mode CS base
        # is vector << 12 = base, and IP = 0. unicorn's 16-bit CS write sets base = selector << 4;
        # in 16-bit mode emu_start's ``begin`` is linear and it sets IP = begin - CS * 16 = 0.
        uc.reg_write(r.UC_X86_REG_CS, self.base >> 4)
        # EFLAGS is 0x2 after INIT; IF and DF are set here on purpose, for cli and cld to clear.
        uc.reg_write(r.UC_X86_REG_EFLAGS, 0x2 | 1 << 9 | 1 << 10)
        assert uc.reg_read(r.UC_X86_REG_CR0) == CR0_AFTER_RESET
        assert uc.reg_read(r.UC_X86_REG_CS) == self.base >> 4

    def run(self, count: int = 1000) -> None:
        self._init_state()
        self.uc.emu_start(self.base, self.stub_end, count=count)
        assert self.trace[0] == self.base  # first fetch at CS:IP = (base >> 4):0

    def qwords(self, addr: int, n: int) -> list[int]:
        return list(struct.unpack(f"<{n}Q", self.uc.mem_read(addr, 8 * n)))


@pytest.mark.parametrize("base", BASES)
def test_trampoline_reaches_the_kernel_entry_in_long_mode(base):
    out = BOOT_PARAMS + 0x800
    probes = [0x5000, 0x1F_FFF8, BOOT_PARAMS + 0x100, 0x1_01F0_0000]
    m = Machine(base, _stub(out, probes))
    for i, va in enumerate(probes):  # distinct markers in physical memory
        m.uc.mem_write(va, struct.pack("<Q", 0xC0DE_0000_0000 + i))

    m.run()

    assert m.interrupts == []
    # Every table instruction ran, in order, at its linear address, then the kernel entry. Since
    # instruction lengths depend on the mode (b8 imm32 is 3 bytes in 16-bit mode, 48 is a REX
    # prefix only in 64-bit mode), this also shows each block ran in its own mode.
    expected = []
    for block in trampoline_blocks(base, **ARGS):
        at = base + block.offset
        for insn in block.items if block.bits else ():
            expected.append(at)
            at += len(insn.code)
    assert m.trace[: len(expected) + 1] == [*expected, ENTRY]

    rip_at_entry, rsi = m.qwords(out, 2)
    assert rip_at_entry == ENTRY
    assert rsi == BOOT_PARAMS
    # identity: each load through paging returned the marker stored at the same physical address
    assert m.qwords(out + 16, len(probes)) == [0xC0DE_0000_0000 + i for i in range(len(probes))]

    uc = m.uc
    cr0 = uc.reg_read(r.UC_X86_REG_CR0)
    assert cr0 & 1 and cr0 & 1 << 31  # PE, PG
    assert not cr0 & (1 << 29 | 1 << 30)  # NW, CD clear: caches on (both were set at the start)
    assert cr0 & 1 << 4  # ET kept
    assert uc.reg_read(r.UC_X86_REG_CR4) & 1 << 5  # PAE
    assert uc.reg_read(r.UC_X86_REG_CR3) == CR3
    efer = uc.msr_read(0xC000_0080)
    assert efer & 1 << 8 and efer & 1 << 10  # LME, LMA
    assert uc.reg_read(r.UC_X86_REG_CS) == 0x10
    for seg in (r.UC_X86_REG_DS, r.UC_X86_REG_ES, r.UC_X86_REG_SS):
        assert uc.reg_read(seg) == 0x18
    eflags = uc.reg_read(r.UC_X86_REG_EFLAGS)
    assert not eflags & 1 << 9 and not eflags & 1 << 10  # IF, DF clear
    # The code writes only its handshake words: the rest of the page reads back as loaded.
    page = bytes(uc.mem_read(base, len(m.code)))
    hs = slice(HANDSHAKE_OFFSET, HANDSHAKE_OFFSET + HANDSHAKE_SIZE)
    assert page[:hs.start] + page[hs.stop:] == m.code[:hs.start] + m.code[hs.stop:]
    assert m.code[hs] == bytes(HANDSHAKE_SIZE)  # zero as loaded: a new wake starts from "none"
    assert handshake(page[hs]) == "kernel"


def test_handshake_says_entered_before_the_kernel_entry():
    m = Machine(0x20000, _stub(BOOT_PARAMS + 0x800, []))
    assert handshake(bytes(m.uc.mem_read(0x20000 + HANDSHAKE_OFFSET, HANDSHAKE_SIZE))) == "none"
    m.run(count=8)  # a few real-mode instructions: past the first handshake write, not to the kernel
    assert handshake(bytes(m.uc.mem_read(0x20000 + HANDSHAKE_OFFSET, HANDSHAKE_SIZE))) == "entered"


def test_unmapped_address_faults_after_the_switch():
    # 1 GiB is backed by emulator memory but not in the page tables: a load must page-fault.
    m = Machine(0x20000, bytes.fromhex("48a1") + struct.pack("<Q", 0x4000_0000) + b"\xf4")
    m.run()
    assert m.interrupts == [14]  # #PF
    assert m.uc.reg_read(r.UC_X86_REG_CR2) == 0x4000_0000


def test_page_tables_without_the_trampoline_page_fault_at_paging_on():
    # The page tables must identity-map the trampoline page (SDM §9.8.5): without it, the fetch
    # after "mov cr0, eax" faults. This is the caller's duty; the test documents it.
    m = Machine(0x20000, b"\xf4", ranges=[(0x1_0000_0000, 0x1_0200_0000)], cr3=0x10_0000)
    m.run()
    assert m.interrupts == [14]
    assert ENTRY not in m.trace


# --- validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "base, kwargs, match",
    [
        (0x20000, dict(ARGS, cr3=0x1_0000_0000), "below 4 GiB"),
        (0x20000, dict(ARGS, cr3=0x10_0800), "aligned"),
        (0x20800, ARGS, "aligned"),
        (0x10_0000, ARGS, "below 1 MiB"),
        (-0x1000, ARGS, "below 1 MiB"),
        (0x20000, dict(ARGS, entry=0), "entry"),
        (0x20000, dict(ARGS, boot_params=0), "boot_params"),
        (0x20000, dict(ARGS, entry=1 << 47), "entry"),
    ],
)
def test_bad_arguments_are_refused(base, kwargs, match):
    with pytest.raises(UsageError, match=match):
        build_trampoline(base, **kwargs)
    with pytest.raises(UsageError, match=match):
        trampoline_listing(base, **kwargs)
