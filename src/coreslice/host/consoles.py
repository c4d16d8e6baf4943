"""Serial ports a slice may use as its console: legacy 16550 ports and PCI UARTs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from coreslice.host.sysfs import host_file_error, link_name, parse_int, read_text

PCI_ADDR = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")
# PCI Code and ID Assignment spec §1.8: base class 07 (communication), subclass 00 (serial).
UART_CLASS_PREFIX = 0x0700
IORESOURCE_IO = 0x100  # include/linux/ioport.h: the flag sysfs "resource" lines carry for I/O BARs


@dataclass(frozen=True)
class SerialPort:
    tty: str
    port: int
    type: int      # serial_core PORT_* type; 0 means no UART answered there
    in_use_as_console: bool


@dataclass(frozen=True)
class PciFunction:
    address: str
    class_code: int
    driver: str | None
    io_bars: list[tuple[int, int]]  # (start, end exclusive)

    @property
    def is_uart(self) -> bool:
        return self.class_code >> 8 == UART_CLASS_PREFIX


def normalize_pci_address(text: str) -> str | None:
    m = PCI_ADDR.match(text.strip())
    if not m:
        return None
    seg, bus, dev, fn = m.groups()
    return f"{(seg or '0000').lower()}:{bus.lower()}:{dev.lower()}.{fn}"


def read_console_ttys(root: Path) -> set[str]:
    """Names of ttys the host uses as consoles (/proc/consoles)."""
    text = read_text(root, "proc/consoles", "") or ""
    return {line.split()[0] for line in text.splitlines() if line.split()}


def read_serial_ports(root: Path) -> list[SerialPort]:
    consoles = read_console_ttys(root)
    base = root / "sys/class/tty"
    out = []
    if not base.is_dir():
        return out
    for d in sorted(base.iterdir()):
        if not d.name.startswith("ttyS"):
            continue
        port = read_text(root, f"sys/class/tty/{d.name}/port")
        typ = read_text(root, f"sys/class/tty/{d.name}/type", "0")
        iotype = read_text(root, f"sys/class/tty/{d.name}/io_type", "0")
        if port is None or iotype not in ("0", None):  # io_type 0 = UPIO_PORT
            continue
        numbers = []
        for attr, text, base in (("port", port, 16), ("type", typ or "0", 10)):
            try:
                numbers.append(parse_int(text, base))
            except ValueError as e:
                raise host_file_error(root, f"sys/class/tty/{d.name}/{attr}", f"not a number ({e})") from None
        out.append(SerialPort(d.name, numbers[0], numbers[1], d.name in consoles))
    return out


def read_pci_function(root: Path, address: str) -> PciFunction | None:
    rel = f"sys/bus/pci/devices/{address}"
    cls = read_text(root, f"{rel}/class")
    if cls is None:
        return None
    driver = link_name(root / rel / "driver")
    bars = []
    for i, line in enumerate((read_text(root, f"{rel}/resource", "") or "").splitlines()):
        if i >= 6:  # BARs 0-5 only; the ROM and bridge windows follow
            break
        fields = line.split()
        if len(fields) != 3:
            continue
        try:
            start, end, flags = (parse_int(x, 16) for x in fields)
        except ValueError as e:
            raise host_file_error(root, f"{rel}/resource", f"line {i + 1} is not 'start end flags' in hex ({e})") from None
        if flags & IORESOURCE_IO and end > start:
            bars.append((start, end + 1))
    try:
        class_code = parse_int(cls, 16)
    except ValueError as e:
        raise host_file_error(root, f"{rel}/class", f"not a class code ({e})") from None
    return PciFunction(address, class_code, driver, bars)


def pci_console_ttys(root: Path, address: str) -> list[str]:
    """ttys the host created for a PCI UART (so we can tell the user what goes away)."""
    tty_dir = root / f"sys/bus/pci/devices/{address}/tty"
    return sorted(p.name for p in tty_dir.iterdir()) if tty_dir.is_dir() else []
