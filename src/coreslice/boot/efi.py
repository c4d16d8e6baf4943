"""A minimal UEFI for the slice: just enough that a stock kernel's reboot and poweroff stay in it.

Why.  A stock x86 kernel restarts through native_machine_emergency_restart
(arch/x86/kernel/reboot.c), a loop over methods each of which resets the *whole machine* on
hardware: the keyboard controller (0xFE to port 0x64), the BIOS (a jump to F000:FFF0 after writing
CMOS register 0x0F), port 0xCF9, a triple fault.  The one method that calls code we supply is EFI:
``reboot=efi`` makes it the first one tried, and efi_reboot() calls the firmware's
ResetSystem(), which never returns here.  Poweroff goes the same way: with hardware-reduced ACPI,
drivers/firmware/efi/reboot.c registers efi_power_off ahead of ACPI S5
(efi_poweroff_required(): acpi_gbl_reduced_hardware), which calls ResetSystem(EfiResetShutdown).

What the kernel is given (boot_params.efi_info, Documentation/arch/x86/zero-page.rst 0x1c0,
struct efi_info in arch/x86/include/uapi/asm/bootparam.h; "EL64" marks a 64-bit EFI loader in
arch/x86/kernel/setup.c):

- an EFI memory map with one descriptor: the runtime page below, EfiRuntimeServicesCode with
  EFI_MEMORY_RUNTIME | EFI_MEMORY_WB (UEFI 2.10 §7.2.3 GetMemoryMap).  Linux maps every runtime
  region into its efi_mm both 1:1 and at a virtual address (arch/x86/platform/efi/efi_64.c
  efi_map_region: "1:1 mappings are present as a catch-all"), code regions executable;
- a system table (§4.3) with a runtime services table (§4.5) whose services are three stubs;
- two configuration tables (§4.6): EFI_ACPI_20_TABLE_GUID -> the slice's RSDP (§4.6.1), and
  EFI_RT_PROPERTIES_TABLE (§4.6.2) declaring only SetVirtualAddressMap and ResetSystem
  supported.  Linux ANDs that into efi.runtime_supported_mask (drivers/firmware/efi/efi.c
  efi_config_parse_tables), so it registers no efivars, no efi-pstore, no rtc-efi, and loads no
  certificates from variables.

The stubs (Microsoft x64 calling convention, as every UEFI service: arguments in RCX, RDX, R8,
R9, status in RAX; §2.3.4.2):

- SetVirtualAddressMap returns EFI_SUCCESS and changes nothing.  The pointers it would convert
  stay physical, which the kernel tolerates on purpose: it re-reads systab->runtime after the
  call (efi_set_virtual_address_map) and calls through it inside efi_mm, where the 1:1 mapping
  stays.  The code is position independent (RIP-relative), so it runs at either address;
- ResetSystem (§8.5.1) records its ResetType and ResetStatus in the status record, counts the
  call, and parks the CPU: ``cli; hlt`` in a loop (an NMI returns to the hlt);
- every other service returns EFI_UNSUPPORTED (Appendix D).  Linux calls SetVariable once
  regardless of the mask (efi_delete_dummy_variable in arch/x86/platform/efi/quirks.c).

Each entry starts with ENDBR64, a NOP without CET, so an indirect call is legal with IBT on
(Linux also switches IBT off around firmware calls: efi_disable_ibt_for_runtime).

Runtime page layout (offsets in the page; all of it must sit in e820-reserved slice memory)::

    0x000  GetTime ... (every unsupported service)   0x010 SetVirtualAddressMap   0x020 ResetSystem
    0x100  EFI_SYSTEM_TABLE          0x180  EFI_RUNTIME_SERVICES
    0x210  EFI_CONFIGURATION_TABLE[2]   0x240  EFI_RT_PROPERTIES_TABLE   0x250  firmware vendor
    0xF00  status record, host-readable (STATUS_*): u64 magic, u32 SVAM calls, u32 ResetSystem
           calls, u32 last ResetType, u32 reserved, u64 last ResetStatus

The second page holds the memory map (not itself a runtime region: the kernel copies it early).
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass
from typing import NamedTuple

from coreslice.boot.layout import PAGE
from coreslice.errors import UsageError

AREA_SIZE = 2 * PAGE          # runtime page + memory-map page
RUNTIME_PAGES = 1

# UEFI 2.10 §4.2.1 EFI_TABLE_HEADER signatures and revision.
SYSTEM_TABLE_SIGNATURE = 0x5453595320494249    # "IBI SYST"
RUNTIME_SERVICES_SIGNATURE = 0x56524553544E5552  # "RUNTSERV"
SPEC_REVISION = (2 << 16) | 100               # EFI_2_100_SYSTEM_TABLE_REVISION: Linux prints "EFI v2.10"
FIRMWARE_REVISION = 1
FIRMWARE_VENDOR = "coreslice"

# §7.2.3: EFI_MEMORY_TYPE and attributes; EFI_MEMORY_DESCRIPTOR_VERSION.
EFI_RUNTIME_SERVICES_CODE = 5
EFI_CONVENTIONAL_MEMORY = 7  # §7.2.1 Table 7-5: free memory
EFI_MEMORY_MAPPED_IO = 11  # §7.2.1 Table 7-5: device registers
EFI_MEMORY_UC = 0x1  # §7.2.1: uncacheable
EFI_MEMORY_WB = 0x8
EFI_MEMORY_RUNTIME = 1 << 63
MEMORY_DESCRIPTOR_VERSION = 1

# Appendix D status codes (high bit: error).
EFI_SUCCESS = 0
EFI_UNSUPPORTED = (1 << 63) | 3

# §8.5.1 EFI_RESET_TYPE.
RESET_TYPES = {0: "cold", 1: "warm", 2: "shutdown", 3: "platform-specific"}

# §4.6.1 / §4.6.2 configuration-table GUIDs.
ACPI_20_TABLE_GUID = uuid.UUID("8868e871-e4f1-11d3-bc22-0080c73c8881")
RT_PROPERTIES_TABLE_GUID = uuid.UUID("eb66918a-7eef-402a-842e-931d21c38ae9")
RT_PROPERTIES_VERSION = 1
# §4.6.2 Table 4.8 EFI_RT_SUPPORTED_* bits.
RT_SUPPORTED_SET_VIRTUAL_ADDRESS_MAP = 0x0080
RT_SUPPORTED_RESET_SYSTEM = 0x0400
RT_SUPPORTED = RT_SUPPORTED_SET_VIRTUAL_ADDRESS_MAP | RT_SUPPORTED_RESET_SYSTEM

# arch/x86/include/asm/efi.h: EFI64_LOADER_SIGNATURE.
LOADER_SIGNATURE_64 = b"EL64"

# Offsets in the runtime page.
UNSUPPORTED_OFFSET = 0x000
SVAM_OFFSET = 0x010
RESET_OFFSET = 0x020
SYSTEM_TABLE_OFFSET = 0x100
RUNTIME_SERVICES_OFFSET = 0x180
CONFIG_TABLES_OFFSET = 0x210
RT_PROPERTIES_OFFSET = 0x240
VENDOR_OFFSET = 0x250
STATUS_OFFSET = 0xF00
STATUS_MAGIC = b"CSLCEFI1"
# The record: magic, svam_calls, reset_calls, reset_type, reserved, reset_status.
STATUS_FORMAT = "<8sIIIIQ"
STATUS_SIZE = struct.calcsize(STATUS_FORMAT)
STATUS_SVAM_CALLS = STATUS_OFFSET + 0x08
STATUS_RESET_CALLS = STATUS_OFFSET + 0x0C
STATUS_RESET_TYPE = STATUS_OFFSET + 0x10
STATUS_RESET_STATUS = STATUS_OFFSET + 0x18

MEMMAP_OFFSET = PAGE  # the second page
MEMORY_DESCRIPTOR_SIZE = 40  # sizeof(EFI_MEMORY_DESCRIPTOR), §7.2.3

# §4.3.1 EFI_SYSTEM_TABLE (64-bit): Hdr, FirmwareVendor, FirmwareRevision (+4 pad), ConsoleInHandle,
# ConIn, ConsoleOutHandle, ConOut, StandardErrorHandle, StdErr, RuntimeServices, BootServices,
# NumberOfTableEntries, ConfigurationTable.
_TABLE_HEADER = "<QIIII"                     # §4.2.1: Signature, Revision, HeaderSize, CRC32, Reserved
_SYSTEM_TABLE = "<QIIII" "Q I4x QQQQQQ QQ QQ"
SYSTEM_TABLE_SIZE = struct.calcsize(_SYSTEM_TABLE)  # 120
# §4.5.1 EFI_RUNTIME_SERVICES: Hdr + 14 function pointers, in this order.
RUNTIME_SERVICES = (
    "GetTime", "SetTime", "GetWakeupTime", "SetWakeupTime", "SetVirtualAddressMap", "ConvertPointer",
    "GetVariable", "GetNextVariableName", "SetVariable", "GetNextHighMonotonicCount", "ResetSystem",
    "UpdateCapsule", "QueryCapsuleCapabilities", "QueryVariableInfo",
)
_RUNTIME_SERVICES = "<QIIII" + "Q" * len(RUNTIME_SERVICES)
RUNTIME_SERVICES_SIZE = struct.calcsize(_RUNTIME_SERVICES)  # 136
_CONFIG_TABLE = "<16sQ"                      # §4.6: VendorGuid, VendorTable
_RT_PROPERTIES = "<HHI"                      # §4.6.2: Version, Length, RuntimeServicesSupported
_MEMORY_DESCRIPTOR = "<IIQQQQ"               # Type, pad, PhysicalStart, VirtualStart, NumberOfPages, Attribute
_EFI_INFO = "<4sIIIIIII"                     # struct efi_info, bootparam.h
EFI_INFO_SIZE = struct.calcsize(_EFI_INFO)   # 32


class Insn(NamedTuple):
    """One instruction: its bytes and the NASM text they disassemble to (iced-x86 checks both)."""

    code: bytes
    text: str
    note: str = ""


def _h(s: str) -> bytes:
    return bytes.fromhex(s)


# The stubs.  RIP-relative displacements are fixed by the layout above (the code and the record
# share the page), so the bytes do not depend on where the page is: the text gives each target
# as an offset in the page (a decoder run at ip = page base shows base + offset).
CODE: tuple[tuple[str, int, tuple[Insn, ...]], ...] = (
    ("unsupported", UNSUPPORTED_OFFSET, (
        Insn(_h("f30f1efa"), "endbr64", "IBT landing pad; a NOP without CET"),
        Insn(_h("48b80300000000000080"), "mov rax, 0x8000000000000003", "EFI_UNSUPPORTED"),
        Insn(_h("c3"), "ret"),
    )),
    ("set_virtual_address_map", SVAM_OFFSET, (
        Insn(_h("f30f1efa"), "endbr64"),
        Insn(_h("f0ff05ed0e0000"), "lock inc dword [rel 0xf08]", "status: SVAM calls += 1"),
        Insn(_h("33c0"), "xor eax, eax", "EFI_SUCCESS; pointers stay physical (see above)"),
        Insn(_h("c3"), "ret"),
    )),
    ("reset_system", RESET_OFFSET, (
        Insn(_h("f30f1efa"), "endbr64"),
        Insn(_h("fa"), "cli", "never to run the kernel again on this CPU"),
        Insn(_h("890de50e0000"), "mov [rel 0xf10], ecx", "status: ResetType"),
        Insn(_h("488915e60e0000"), "mov [rel 0xf18], rdx", "status: ResetStatus"),
        Insn(_h("f0ff05d30e0000"), "lock inc dword [rel 0xf0c]", "status: calls += 1, last (x86 stores are ordered)"),
        Insn(_h("f4"), "hlt", "park; INIT-SIPI-SIPI (a relaunch) still wakes it"),
        Insn(_h("ebfd"), "jmp short 0x39", "an NMI returns here: halt again"),
    )),
)

_ENTRY = {"unsupported": UNSUPPORTED_OFFSET, "set_virtual_address_map": SVAM_OFFSET, "reset_system": RESET_OFFSET}
SERVICE_ENTRY = {name: _ENTRY["unsupported"] for name in RUNTIME_SERVICES} | {
    "SetVirtualAddressMap": SVAM_OFFSET, "ResetSystem": RESET_OFFSET}


def code_bytes() -> bytes:
    """The code part of the runtime page (offset 0 up to the end of the last stub)."""
    out = bytearray()
    for _, offset, items in CODE:
        assert len(out) <= offset
        out += b"\xcc" * (offset - len(out))  # int3 between stubs
        for insn in items:
            out += insn.code
    return bytes(out)


def _sealed(fmt: str, *fields) -> bytes:
    """A table that starts with EFI_TABLE_HEADER, CRC32 filled in (§4.2.1: the standard CRC-32
    over HeaderSize bytes with the CRC32 field zero)."""
    raw = bytearray(struct.pack(fmt, *fields))
    crc = zlib.crc32(raw) & 0xFFFFFFFF
    struct.pack_into("<I", raw, 16, crc)
    return bytes(raw)


@dataclass(frozen=True)
class EfiFirmware:
    base: int
    data: bytes                 # AREA_SIZE bytes, to be written at ``base``
    systab_addr: int
    memmap_addr: int
    memmap_size: int

    @property
    def status_addr(self) -> int:
        """Physical address of the status record the host can read (read_status)."""
        return self.base + STATUS_OFFSET

    def efi_info(self) -> bytes:
        """boot_params.efi_info (0x1c0, 32 bytes)."""
        return struct.pack(_EFI_INFO, LOADER_SIGNATURE_64, self.systab_addr & 0xFFFFFFFF,
                           MEMORY_DESCRIPTOR_SIZE, MEMORY_DESCRIPTOR_VERSION,
                           self.memmap_addr & 0xFFFFFFFF, self.memmap_size,
                           self.systab_addr >> 32, self.memmap_addr >> 32)


def build_efi_firmware(base: int, rsdp_addr: int, ram: tuple[tuple[int, int], ...] = (),
                       mmio: tuple[tuple[int, int], ...] = ()) -> EfiFirmware:
    """The two pages at ``base`` (page aligned, in the slice's reserved memory).  ``ram``: the
    (address, size) of each RAM entry of the slice's e820 map, listed as EfiConventionalMemory:
    with efi_info set the decompressor picks its physical KASLR slot from the EFI map
    (arch/x86/boot/compressed/kaslr.c process_efi_entries), not from e820, and without them it
    finds no room ("Physical KASLR disabled: no suitable memory region!").  The kernel's own
    memory still comes from e820 (no add_efi_memmap).  ``mmio``: [start, end) of each ECAM window,
    listed as runtime EfiMemoryMappedIO: the slice finds its MCFG late, from ACPI
    (``pci=noearly``, see plan/boot.py), and Linux then accepts an ECAM window only if a PNP0C02
    device or the EFI map vouches for it (arch/x86/pci/mmconfig-shared.c pci_mmcfg_reserved,
    is_efi_mmio).  By then the kernel has entered EFI virtual mode and kept only the entries with
    EFI_MEMORY_RUNTIME (arch/x86/platform/efi/efi.c efi_map_regions), hence the attribute; the
    cost is an uncached mapping of the window in the EFI page table, which no stub touches."""
    if base <= 0 or base % PAGE or base + AREA_SIZE > 1 << 46:
        raise UsageError(f"EFI area at {base:#x} must be page aligned and below 64 TiB (mapped 1:1 in efi_mm)")
    page = bytearray(AREA_SIZE)
    code = code_bytes()
    page[:len(code)] = code

    fn = {name: base + off for name, off in SERVICE_ENTRY.items()}
    rt = _sealed(_RUNTIME_SERVICES, RUNTIME_SERVICES_SIGNATURE, SPEC_REVISION, RUNTIME_SERVICES_SIZE, 0, 0,
                 *(fn[name] for name in RUNTIME_SERVICES))
    page[RUNTIME_SERVICES_OFFSET:RUNTIME_SERVICES_OFFSET + len(rt)] = rt

    configs = [(ACPI_20_TABLE_GUID, rsdp_addr), (RT_PROPERTIES_TABLE_GUID, base + RT_PROPERTIES_OFFSET)]
    ct = b"".join(struct.pack(_CONFIG_TABLE, guid.bytes_le, addr) for guid, addr in configs)
    assert CONFIG_TABLES_OFFSET + len(ct) <= RT_PROPERTIES_OFFSET
    page[CONFIG_TABLES_OFFSET:CONFIG_TABLES_OFFSET + len(ct)] = ct
    props = struct.pack(_RT_PROPERTIES, RT_PROPERTIES_VERSION, struct.calcsize(_RT_PROPERTIES), RT_SUPPORTED)
    page[RT_PROPERTIES_OFFSET:RT_PROPERTIES_OFFSET + len(props)] = props
    vendor = (FIRMWARE_VENDOR + "\0").encode("utf-16-le")  # CHAR16, NUL terminated
    page[VENDOR_OFFSET:VENDOR_OFFSET + len(vendor)] = vendor

    systab = _sealed(_SYSTEM_TABLE, SYSTEM_TABLE_SIGNATURE, SPEC_REVISION, SYSTEM_TABLE_SIZE, 0, 0,
                     base + VENDOR_OFFSET, FIRMWARE_REVISION,
                     0, 0, 0, 0, 0, 0,                 # no console handles or protocols
                     base + RUNTIME_SERVICES_OFFSET, 0,  # runtime services; boot services are gone
                     len(configs), base + CONFIG_TABLES_OFFSET)
    page[SYSTEM_TABLE_OFFSET:SYSTEM_TABLE_OFFSET + len(systab)] = systab

    page[STATUS_OFFSET:STATUS_OFFSET + STATUS_SIZE] = struct.pack(STATUS_FORMAT, STATUS_MAGIC, 0, 0, 0, 0, 0)

    entries = [(base, EFI_RUNTIME_SERVICES_CODE, RUNTIME_PAGES, EFI_MEMORY_RUNTIME | EFI_MEMORY_WB)]
    for addr, size in ram:
        start, end = -(-addr // PAGE) * PAGE, (addr + size) // PAGE * PAGE  # whole pages inside
        if end > start:
            entries.append((start, EFI_CONVENTIONAL_MEMORY, (end - start) // PAGE, EFI_MEMORY_WB))
    for start, end in mmio:
        start, end = start // PAGE * PAGE, -(-end // PAGE) * PAGE
        entries.append((start, EFI_MEMORY_MAPPED_IO, (end - start) // PAGE,
                        EFI_MEMORY_RUNTIME | EFI_MEMORY_UC))
    desc = b"".join(struct.pack(_MEMORY_DESCRIPTOR, kind, 0, start, 0, pages, attr)
                    for start, kind, pages, attr in sorted(entries))
    if len(desc) > AREA_SIZE - MEMMAP_OFFSET:
        raise UsageError(f"the slice's memory map has {len(entries)} entries, more than the EFI map page holds")
    page[MEMMAP_OFFSET:MEMMAP_OFFSET + len(desc)] = desc
    assert len(code) <= SYSTEM_TABLE_OFFSET and VENDOR_OFFSET + len(vendor) <= STATUS_OFFSET
    return EfiFirmware(base=base, data=bytes(page), systab_addr=base + SYSTEM_TABLE_OFFSET,
                       memmap_addr=base + MEMMAP_OFFSET, memmap_size=len(desc))


@dataclass(frozen=True)
class EfiStatus:
    """What the slice's firmware stubs recorded (read from the host through /dev/mem)."""

    svam_calls: int             # 1 once the slice kernel entered EFI virtual mode
    reset_calls: int            # > 0: the slice called ResetSystem and its CPU is parked
    reset_type: str | None      # "cold", "warm", "shutdown", "platform-specific" (None: no call)
    reset_status: int

    def to_json(self) -> dict:
        return {"svam_calls": self.svam_calls, "reset_calls": self.reset_calls,
                "reset_type": self.reset_type, "reset_status": self.reset_status}


def read_status(raw: bytes) -> EfiStatus | None:
    """Decode the STATUS_SIZE bytes at ``status_addr``; None if they are not a status record."""
    if len(raw) < STATUS_SIZE:
        return None
    magic, svam, calls, rtype, _, rstatus = struct.unpack_from(STATUS_FORMAT, raw)
    if magic != STATUS_MAGIC:
        return None
    kind = RESET_TYPES.get(rtype, f"type-{rtype}") if calls else None
    return EfiStatus(svam_calls=svam, reset_calls=calls, reset_type=kind, reset_status=rstatus)
