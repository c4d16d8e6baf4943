"""Plan -> boot image: the (physical address, contents) segments to write, and nothing else.

Pure: no I/O except that file-backed segments (kernel, initrd) are described by path, offset and
length, and only read when written, chunk by chunk, so memory use does not grow with their size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from coreslice.boot import lowmem
from coreslice.boot.efi import build_efi_firmware
from coreslice.boot.layout import PAGE
from coreslice.boot.pagetables import build_identity_page_tables
from coreslice.boot.trampoline import build_trampoline
from coreslice.boot.zeropage import E820Type, build_zero_page

CHUNK = 2 << 20


@dataclass(frozen=True)
class Segment:
    name: str
    addr: int
    size: int
    data: bytes | None = None         # in-memory contents, or
    path: Path | None = None          # a file region
    offset: int = 0

    def chunks(self, chunk: int = CHUNK) -> Iterator[tuple[int, bytes]]:
        """(physical address, bytes) pieces of at most `chunk` bytes."""
        if self.data is not None:
            for pos in range(0, self.size, chunk):
                yield self.addr + pos, self.data[pos:pos + chunk]
            return
        assert self.path is not None
        # One buffer, refilled in place: memory stays at one chunk whatever the file's size.
        buf = bytearray(min(chunk, self.size))
        view = memoryview(buf)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            pos = 0
            while pos < self.size:
                n = f.readinto(view[:min(chunk, self.size - pos)])
                if not n:
                    raise IOError(f"{self.path} shrank while being written (at byte {self.offset + pos})")
                # The whole buffer when full (bytes == bytearray compares with memcmp; a memoryview
                # compares element by element), a copy only for the short last chunk.
                yield self.addr + pos, buf if n == len(buf) else bytes(view[:n])
                pos += n

    def to_json(self) -> dict:
        return {"name": self.name, "addr": self.addr, "size": self.size,
                "source": str(self.path) if self.path else "generated"}


@dataclass(frozen=True)
class BootImage:
    segments: list[Segment]
    sipi_vector: int
    acpi_tables: dict[str, int]
    dsdt_asl: str

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.segments)


def build_image(plan) -> BootImage:
    """Every segment the plan needs, in write order; the trampoline page goes last."""
    acpi = plan.acpi.at(plan.acpi_addr)  # encoded once by the plan
    # The slice's EFI runtime: its ResetSystem keeps reboot and poweroff in the slice (boot/efi.py).
    ram = tuple((e.addr, e.size) for e in plan.e820 if e.type == E820Type.RAM)
    ecam = tuple(plan.pci.ecam) if plan.pci else ()
    fw = build_efi_firmware(plan.efi_addr, acpi.rsdp_addr, ram, ecam) if plan.efi_addr else None
    zero_page = build_zero_page(
        plan.kernel, load_addr=plan.load_addr, cmdline_addr=plan.cmdline_addr,
        initrd_addr=plan.initrd_addr, initrd_size=plan.initrd_size,
        rsdp_addr=acpi.rsdp_addr, e820=plan.e820, efi_info=fw.efi_info() if fw else b"")
    tables = build_identity_page_tables(plan.page_tables_addr, plan.page_table_ranges)
    tramp = bytearray(build_trampoline(plan.slot, cr3=plan.page_tables_addr, entry=plan.entry,
                                       boot_params=plan.zero_page_addr))
    tramp = tramp.ljust(PAGE, b"\0")
    record = lowmem.SlotRecord(plan.boot_id, tuple(plan.apic_ids), plan.mem_base, plan.mem_size).encode()
    off = lowmem.RECORD_OFFSET
    tramp[off:off + len(record)] = record
    cmdline = plan.cmdline.encode() + b"\0"

    segs = [Segment("kernel", plan.load_addr, plan.kernel.kernel_size,
                    path=plan.kernel.path, offset=plan.kernel.kernel_offset)]
    if plan.initrd_size:
        segs.append(Segment("initrd", plan.initrd_addr, plan.initrd_size, path=plan.initrd))
    segs += [
        Segment("zero_page", plan.zero_page_addr, len(zero_page), zero_page),
        Segment("cmdline", plan.cmdline_addr, len(cmdline), cmdline),
        Segment("acpi", plan.acpi_addr, len(acpi.data), acpi.data),
        *([Segment("efi", fw.base, len(fw.data), fw.data)] if fw else []),
        Segment("page_tables", plan.page_tables_addr, len(tables), tables),
        Segment("trampoline", plan.slot, len(tramp), bytes(tramp)),
    ]
    return BootImage(segs, plan.sipi_vector, acpi.tables, plan.dsdt_asl)
