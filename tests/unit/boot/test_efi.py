"""The slice's EFI runtime (boot/efi.py): its text matches its bytes (iced-x86), the tables read
back the way Linux reads them, and the stubs do what they say when executed (unicorn)."""

import struct
import uuid
import zlib

import iced_x86
import pytest
from unicorn import UC_ARCH_X86, UC_HOOK_CODE, UC_MODE_64, Uc
from unicorn import x86_const as r

from coreslice.boot import efi
from coreslice.errors import UsageError

from .test_trampoline import _formatter, normalise  # the same NASM text rules

BASES = [0x7FFE0000, 0x1_7FFF0000, 0x3F_FFFF_E000]
RSDP = 0x7FFD1000
RETURN = 0xDEAD0000  # a return address outside the page: emulation stops when the stub returns


def test_text_matches_its_bytes():
    """Decoded at ip = the page offset, every instruction's bytes say exactly its text (so the
    RIP-relative targets in the text are offsets in the page: the status record's fields)."""
    fmt = _formatter()
    code = efi.code_bytes()
    for name, offset, items in efi.CODE:
        data = b"".join(i.code for i in items)
        assert code[offset:offset + len(data)] == data, name
        decoded = list(iced_x86.Decoder(64, data, ip=offset))
        assert len(decoded) == len(items), name
        for insn, dec in zip(items, decoded):
            assert not dec.is_invalid and dec.len == len(insn.code), insn
            assert normalise(fmt.format(dec)) == normalise(insn.text), insn.code.hex()
    text = {i.text for _, _, items in efi.CODE for i in items}
    assert f"mov [rel {efi.STATUS_RESET_TYPE:#x}], ecx" in text
    assert f"mov [rel {efi.STATUS_RESET_STATUS:#x}], rdx" in text
    assert f"lock inc dword [rel {efi.STATUS_RESET_CALLS:#x}]" in text
    assert f"lock inc dword [rel {efi.STATUS_SVAM_CALLS:#x}]" in text


def _u64(data, off):
    return struct.unpack_from("<Q", data, off)[0]


def _header_ok(data, off, signature, size):
    sig, rev, hsize, crc, _ = struct.unpack_from("<QIIII", data, off)
    raw = bytearray(data[off:off + size])
    raw[16:20] = b"\0" * 4
    assert (sig, rev, hsize) == (signature, efi.SPEC_REVISION, size)
    assert crc == zlib.crc32(raw) & 0xFFFFFFFF  # UEFI 2.10 §4.2.1


@pytest.mark.parametrize("base", BASES)
def test_tables_read_back_as_linux_reads_them(base):
    """What arch/x86/platform/efi/efi.c and drivers/firmware/efi/efi.c read, in their order:
    efi_info -> system table -> runtime services + config tables -> RT properties mask, and the
    memory map whose runtime region must hold everything the kernel touches inside efi_mm."""
    fw = efi.build_efi_firmware(base, RSDP)
    data = fw.data
    assert len(data) == efi.AREA_SIZE
    at = lambda addr: addr - base  # noqa: E731

    sig, systab_lo, desc_size, desc_ver, mm_lo, mm_size, systab_hi, mm_hi = struct.unpack("<4sIIIIIII", fw.efi_info())
    assert sig == b"EL64" and desc_ver == 1 and desc_size == efi.MEMORY_DESCRIPTOR_SIZE
    systab = systab_lo | systab_hi << 32
    memmap = mm_lo | mm_hi << 32
    assert systab == fw.systab_addr and memmap == fw.memmap_addr and mm_size == desc_size

    _header_ok(data, at(systab), efi.SYSTEM_TABLE_SIGNATURE, efi.SYSTEM_TABLE_SIZE)
    vendor, _rev = struct.unpack_from("<QI", data, at(systab) + 24)
    runtime, boot, nr_tables, tables = struct.unpack_from("<QQQQ", data, at(systab) + 88)
    assert boot == 0 and nr_tables == 2
    raw = data[at(vendor):at(vendor) + 200]  # map_fw_vendor maps 100 CHAR16
    assert raw.decode("utf-16-le").split("\0")[0] == "coreslice"

    _header_ok(data, at(runtime), efi.RUNTIME_SERVICES_SIGNATURE, efi.RUNTIME_SERVICES_SIZE)
    fns = dict(zip(efi.RUNTIME_SERVICES, struct.unpack_from("<14Q", data, at(runtime) + 24)))
    assert fns["ResetSystem"] == base + efi.RESET_OFFSET
    assert fns["SetVirtualAddressMap"] == base + efi.SVAM_OFFSET
    assert {fns[n] for n in efi.RUNTIME_SERVICES if n not in ("ResetSystem", "SetVirtualAddressMap")} == {base}

    configs = {}
    for i in range(nr_tables):
        guid, addr = struct.unpack_from("<16sQ", data, at(tables) + 24 * i)
        configs[uuid.UUID(bytes_le=guid)] = addr
    assert configs[efi.ACPI_20_TABLE_GUID] == RSDP
    version, length, mask = struct.unpack_from("<HHI", data, at(configs[efi.RT_PROPERTIES_TABLE_GUID]))
    assert (version, length) == (1, 8)
    linux_all = 0x3FFF  # EFI_RT_SUPPORTED_ALL; the kernel keeps mask & this
    assert mask & linux_all == 0x0400 | 0x0080  # ResetSystem, SetVirtualAddressMap: nothing else

    typ, _, phys, virt, pages, attr = struct.unpack_from("<IIQQQQ", data, at(memmap))
    assert (typ, phys, virt, pages) == (efi.EFI_RUNTIME_SERVICES_CODE, base, 0, 1)
    assert attr == efi.EFI_MEMORY_RUNTIME | efi.EFI_MEMORY_WB
    # efi_set_virtual_address_map reads systab->runtime, and every call dereferences the runtime
    # table and runs the stub, inside efi_mm, which maps runtime regions only.
    for addr in (systab, systab + efi.SYSTEM_TABLE_SIZE - 1, runtime, runtime + efi.RUNTIME_SERVICES_SIZE - 1,
                 *fns.values(), fw.status_addr + efi.STATUS_SIZE - 1):
        assert base <= addr < base + pages * 0x1000
    assert efi.read_status(data[at(fw.status_addr):]) == efi.EfiStatus(0, 0, None, 0)


@pytest.mark.parametrize("base", [0, 0x1234, 1 << 46])
def test_bad_base_refused(base):
    with pytest.raises(UsageError, match="page aligned"):
        efi.build_efi_firmware(base, RSDP)


def _machine(base):
    fw = efi.build_efi_firmware(base, RSDP)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(base, efi.AREA_SIZE)
    uc.mem_write(base, fw.data)
    stack = 0x10000
    uc.mem_map(stack, 0x1000)
    uc.mem_map(RETURN, 0x1000)
    uc.mem_write(RETURN, b"\xf4")
    return fw, uc


STACK_TOP = 0x10800


def _status(uc, fw):
    return efi.read_status(bytes(uc.mem_read(fw.status_addr, efi.STATUS_SIZE)))


def _call(uc, entry, rcx=0, rdx=0, limit=64):
    uc.reg_write(r.UC_X86_REG_RSP, STACK_TOP)
    uc.mem_write(STACK_TOP, struct.pack("<Q", RETURN))  # as if called
    uc.reg_write(r.UC_X86_REG_RCX, rcx)
    uc.reg_write(r.UC_X86_REG_RDX, rdx)
    uc.reg_write(r.UC_X86_REG_RAX, 0x1111)
    uc.emu_start(entry, RETURN, count=limit)
    return uc.reg_read(r.UC_X86_REG_RAX), uc.reg_read(r.UC_X86_REG_RIP)


@pytest.mark.parametrize("base", BASES)
def test_unsupported_and_svam_return(base):
    fw, uc = _machine(base)
    rax, rip = _call(uc, base + efi.UNSUPPORTED_OFFSET)
    assert (rax, rip) == (efi.EFI_UNSUPPORTED, RETURN)
    rax, rip = _call(uc, base + efi.SVAM_OFFSET)
    assert (rax, rip) == (efi.EFI_SUCCESS, RETURN)
    assert _status(uc, fw) == efi.EfiStatus(svam_calls=1, reset_calls=0, reset_type=None, reset_status=0)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("kind", [0, 1, 2])
def test_reset_system_records_and_parks(base, kind):
    """ResetSystem(kind, status) writes the record, disables interrupts, and never returns:
    after any number of instructions the CPU is still on its hlt / jmp pair."""
    fw, uc = _machine(base)
    seen = set()
    uc.hook_add(UC_HOOK_CODE, lambda u, addr, size, _: seen.add(addr - base))
    uc.reg_write(r.UC_X86_REG_EFLAGS, 0x202)  # IF set, as a kernel caller may have it
    uc.reg_write(r.UC_X86_REG_RCX, kind)
    uc.reg_write(r.UC_X86_REG_RDX, 0x8000000000000015)
    start = base + efi.RESET_OFFSET
    hlt = start + sum(len(i.code) for i in efi.CODE[2][2][:-1]) - 1
    uc.emu_start(start, RETURN, count=7)  # through the hlt
    assert _status(uc, fw) == efi.EfiStatus(0, 1, efi.RESET_TYPES[kind], 0x8000000000000015)
    assert not uc.reg_read(r.UC_X86_REG_EFLAGS) & 0x200
    # After hlt an NMI would resume at the jmp: from there it is back on the hlt, forever.
    uc.emu_start(hlt + 1, RETURN, count=5)
    assert uc.reg_read(r.UC_X86_REG_RIP) in (hlt, hlt + 1)
    assert RETURN - base not in seen
    assert _status(uc, fw).reset_calls == 1


def test_read_status_rejects_other_bytes():
    assert efi.read_status(b"\0" * efi.STATUS_SIZE) is None
    assert efi.read_status(efi.STATUS_MAGIC) is None


def test_ecam_windows_are_runtime_mmio_in_the_memory_map():
    """pci=noearly: the kernel accepts its ECAM only if the EFI map, as kept after virtual mode
    (runtime entries only), lists it as EfiMemoryMappedIO."""
    base = 0x5FFF0000
    fw = efi.build_efi_firmware(base, 0x5FFF2000, ram=((0x40000000, 0x10000000),),
                                mmio=((0xB2000000, 0xB2400000),))
    off = fw.memmap_addr - base
    descs = [struct.unpack_from("<IIQQQQ", fw.data, off + i) for i in range(0, fw.memmap_size, 40)]
    mmio = [d for d in descs if d[0] == efi.EFI_MEMORY_MAPPED_IO]
    assert mmio == [(efi.EFI_MEMORY_MAPPED_IO, 0, 0xB2000000, 0, 0x400, efi.EFI_MEMORY_RUNTIME | efi.EFI_MEMORY_UC)]
