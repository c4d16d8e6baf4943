"""A synthetic host tree shaped like the emulated machine (q35, 4 CPUs, maxcpus=1 mem=1G, 6 GiB).

Written as files under a directory so that discovery reads it exactly as it reads a live host.
"""

from __future__ import annotations

import struct
from pathlib import Path

from coreslice.acpi.tables import McfgAllocation, Srat, SratCpu, SratMemory, build_mcfg, build_srat

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
                   online: str = "0", cmdline: str = "console=ttyS0 maxcpus=1 mem=1G",
                   kmsg_extra: tuple[str, ...] = (), devmem: bool = False, srat: Srat | None = None) -> Path:
    """``cmdline`` is /proc/cmdline, ``kmsg_extra`` more kernel log lines, ``devmem`` adds a
    dev/mem file (for `host check`)."""
    _w(root, "sys/devices/system/cpu/present", f"0-{ncpus - 1}\n")
    _w(root, "sys/devices/system/cpu/online", online + "\n")
    _w(root, "proc/cpuinfo", "processor\t: 0\napicid\t\t: 0\n\n")
    for n in range(ncpus):
        (root / f"sys/devices/system/cpu/cpu{n}").mkdir(parents=True, exist_ok=True)
    _w(root, "sys/firmware/acpi/tables/APIC", build_host_madt(list(range(ncpus))))
    _w(root, "sys/firmware/acpi/tables/MCFG", build_mcfg([McfgAllocation(0xB0000000, 0, 0, 0xFF)]))
    if srat is not None:  # see two_node_srat
        _w(root, "sys/firmware/acpi/tables/SRAT", build_srat(srat))
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
    _w(root, "proc/cmdline", cmdline + "\n")
    kmsg = "6,1,0,-;Linux version 6.12\n"
    if tsc:
        kmsg += "6,2,0,-;tsc: Detected 2495.999 MHz processor\n6,3,0,-;tsc: Refined TSC clocksource calibration: 2496.012 MHz\n"
    kmsg += "".join(f"6,{9 + i},0,-;{line}\n" for i, line in enumerate(kmsg_extra))
    _w(root, "dev/kmsg", kmsg)
    if devmem:
        _w(root, "dev/mem", b"")
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
    add_pci_roots(root)
    return root


# Two root complexes, as the testbed's q35 with a pxb-pcie: bus 0 (00-1f, which holds the UART
# 0000:00:03.0 and the NIC 0000:00:02.0 above, by bus number), and bus 0x20 with a root port
# 0000:20:00.0 and behind it an SR-IOV NIC 0000:21:00.0 (driver igb) and its VF 0000:21:10.0,
# under /sys/devices/pci0000:20 with the /sys/bus/pci/devices links a real host has.
ROOT_BUS_LINES = (
    "ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00-1f])",
    "PCI host bridge to bus 0000:00",
    "pci_bus 0000:00: root bus resource [io  0x0000-0x0cf7 window]",
    "pci_bus 0000:00: root bus resource [io  0x0d00-0xcfff window]",
    "pci_bus 0000:00: root bus resource [mem 0x000a0000-0x000bffff window]",
    "pci_bus 0000:00: root bus resource [mem 0x80000000-0xafffffff window]",
    "pci_bus 0000:00: root bus resource [mem 0xc0000000-0xfe7fffff window]",
    "pci_bus 0000:00: root bus resource [mem 0xc000000000-0xc7ffffffff window]",
    "pci_bus 0000:00: root bus resource [bus 00-1f]",
    "ACPI: PCI Root Bridge [PC20] (domain 0000 [bus 20-21])",
    "PCI host bridge to bus 0000:20",
    "pci_bus 0000:20: root bus resource [io  0xd000-0xdfff window]",
    "pci_bus 0000:20: root bus resource [mem 0xfe800000-0xfe9fffff window]",
    "pci_bus 0000:20: root bus resource [mem 0xc800000000-0xc81fffffff window]",
    "pci_bus 0000:20: root bus resource [bus 20-21]",
)
ROOT_PORT, SRIOV_NIC, SRIOV_VF = "0000:20:00.0", "0000:21:00.0", "0000:21:10.0"


def add_pci_function(root: Path, path: str, cls: int, *, vendor: int = 0x8086, device: int = 0x1234,
                     driver: str | None = None, extra: dict[str, str] | None = None) -> Path:
    """A function at sys/devices/<path> (e.g. "pci0000:20/0000:20:00.0/0000:21:00.0"), linked from
    sys/bus/pci/devices like the kernel does, bound to ``driver`` if given."""
    d = root / "sys/devices" / path
    d.mkdir(parents=True, exist_ok=True)
    for name, value in {"class": f"0x{cls:06x}", "vendor": f"0x{vendor:04x}", "device": f"0x{device:04x}",
                        **(extra or {})}.items():
        (d / name).write_text(value + "\n")
    link = root / "sys/bus/pci/devices" / d.name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(Path("../../../devices") / path)
    if driver:
        (root / "sys/bus/pci/drivers" / driver).mkdir(parents=True, exist_ok=True)
        depth = len(Path("sys/devices", path).parts)
        (d / "driver").symlink_to(Path(*[".."] * depth, "sys/bus/pci/drivers", driver))
    return d


def add_pci_roots(root: Path) -> None:
    with open(root / "dev/kmsg", "a") as f:
        f.writelines(f"6,{100 + i},0,-;{line}\n" for i, line in enumerate(ROOT_BUS_LINES))
    add_pci_function(root, f"pci0000:20/{ROOT_PORT}", 0x060400, device=0x7C0C, driver="pcieport",
                     extra={"subordinate_bus_number": "33", "secondary_bus_number": "33"})
    pf = add_pci_function(root, f"pci0000:20/{ROOT_PORT}/{SRIOV_NIC}", 0x020000, device=0x10C9, driver="igb",
                          extra={"sriov_totalvfs": "7", "sriov_numvfs": "1"})
    vf = add_pci_function(root, f"pci0000:20/{ROOT_PORT}/{SRIOV_VF}", 0x020000, device=0x10CA)
    (vf / "physfn").symlink_to(Path("..") / pf.name)


def two_node_srat(ncpus: int = 4, split: int = 0x180000000, pxms: tuple[int, int] = (0, 1)) -> Srat:
    """Two NUMA nodes over the tree's RAM (0-2G, 4G-10G): the first half of the CPUs with the RAM
    below ``split`` (0-2G and 4-6G by default), the other half with the rest.  Like QEMU's, the
    table lists every CPU first, then the memory ranges."""
    half = (ncpus + 1) // 2
    cpus = [SratCpu(pxms[0] if n < half else pxms[1], n, True, "lapic") for n in range(ncpus)]
    memory = [SratMemory(pxms[0], 0, 0xA0000, True), SratMemory(pxms[0], 0x100000, 0x80000000 - 0x100000, True),
              SratMemory(pxms[0], 0x100000000, split - 0x100000000, True),
              SratMemory(pxms[1], split, 0x280000000 - split, True)]
    return Srat(cpus, memory)
