"""A synthetic host tree shaped like the emulated machine (q35, 4 CPUs, maxcpus=1 mem=1G, 6 GiB).

Written as files under a directory so that discovery reads it exactly as it reads a live host.
"""

from __future__ import annotations

import struct
from pathlib import Path

from coreslice.acpi.tables import McfgAllocation, build_mcfg

GIB = 1 << 30
BOOT_ID = "3f1c5e0e-2b7a-4a55-9d43-6f0d2d1a9c11"


def build_host_madt(apic_ids: list[int]) -> bytes:
    """A host MADT with type-0 Local APIC entries, like SeaBIOS writes (ACPI 6.5 §5.2.12.2)."""
    body = struct.pack("<II", 0xFEE00000, 1)
    for uid, apic in enumerate(apic_ids):
        body += struct.pack("<BBBBI", 0, 8, uid, apic, 1)
    length = 36 + len(body)
    hdr = struct.pack("<4sIBB6s8sI4sI", b"APIC", length, 3, 0, b"BOCHS ", b"BXPC    ", 1, b"BXPC", 1)
    raw = bytearray(hdr + body)
    raw[9] = (-sum(raw)) & 0xFF
    return bytes(raw)


def _w(root: Path, rel: str, content: str | bytes) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)


def make_host_tree(root: Path, *, ncpus: int = 4, apic_mode: str = "xapic", tsc: bool = True,
                   online: str = "0") -> Path:
    _w(root, "sys/devices/system/cpu/present", f"0-{ncpus - 1}\n")
    _w(root, "sys/devices/system/cpu/online", online + "\n")
    _w(root, "proc/cpuinfo", "processor\t: 0\napicid\t\t: 0\n\n")
    for n in range(ncpus):
        (root / f"sys/devices/system/cpu/cpu{n}").mkdir(parents=True, exist_ok=True)
    _w(root, "sys/firmware/acpi/tables/APIC", build_host_madt(list(range(ncpus))))
    _w(root, "sys/firmware/acpi/tables/MCFG", build_mcfg([McfgAllocation(0xB0000000, 0, 0, 0xFF)]))
    fw = [(0x0, 0x9FBFF, "System RAM"), (0x9FC00, 0x9FFFF, "Reserved"), (0xF0000, 0xFFFFF, "Reserved"),
          (0x100000, 0x7FFDEFFF, "System RAM"), (0x7FFDF000, 0x7FFFFFFF, "Reserved"),
          (0xB0000000, 0xBFFFFFFF, "Reserved"), (0x100000000, 0x27FFFFFFF, "System RAM")]
    for i, (s, e, t) in enumerate(fw):
        _w(root, f"sys/firmware/memmap/{i}/start", f"0x{s:x}\n")
        _w(root, f"sys/firmware/memmap/{i}/end", f"0x{e:x}\n")
        _w(root, f"sys/firmware/memmap/{i}/type", t + "\n")
    _w(root, "proc/iomem", "00000000-00000fff : Reserved\n00001000-0009fbff : System RAM\n"
                           "0009fc00-0009ffff : Reserved\n00100000-3fffffff : System RAM\n"
                           "  01000000-01ffffff : Kernel code\nb0000000-bfffffff : PCI ECAM 0000 [bus 00-ff]\n"
                           "fee00000-fee00fff : Local APIC\n")
    _w(root, "proc/sys/kernel/random/boot_id", BOOT_ID + "\n")
    _w(root, "proc/cmdline", "console=ttyS0 maxcpus=1 mem=1G\n")
    kmsg = "6,1,0,-;Linux version 6.12\n"
    if tsc:
        kmsg += "6,2,0,-;tsc: Detected 2495.999 MHz processor\n6,3,0,-;tsc: Refined TSC clocksource calibration: 2496.012 MHz\n"
    _w(root, "dev/kmsg", kmsg)
    msr = bytearray(0x1B + 8)
    struct.pack_into("<Q", msr, 0x1B, 0xFEE00900 | (0x400 if apic_mode == "x2apic" else 0))
    _w(root, "dev/cpu/0/msr", bytes(msr))
    _w(root, "proc/consoles", "ttyS0                -W- (EC p a)    4:64\n")
    for i, port in enumerate([0x3F8, 0x2F8, 0x3E8, 0x2E8]):
        _w(root, f"sys/class/tty/ttyS{i}/port", f"0x{port:X}\n")
        _w(root, f"sys/class/tty/ttyS{i}/type", "4\n")
        _w(root, f"sys/class/tty/ttyS{i}/io_type", "0\n")
    _w(root, "sys/class/tty/ttyS7/port", "0x0\n")
    _w(root, "sys/class/tty/ttyS7/type", "0\n")
    _w(root, "sys/class/tty/ttyS7/io_type", "0\n")
    uart = "sys/bus/pci/devices/0000:00:03.0"
    _w(root, f"{uart}/class", "0x070002\n")
    _w(root, f"{uart}/resource", "0x000000000000c000 0x000000000000c007 0x0000000000040101\n" + "0x0 0x0 0x0\n" * 6)
    _w(root, f"{uart}/enable", "1\n")
    nic = "sys/bus/pci/devices/0000:00:02.0"
    _w(root, f"{nic}/class", "0x020000\n")
    _w(root, f"{nic}/resource", "0x00000000fe000000 0x00000000fe01ffff 0x0000000000040200\n")
    return root
