"""Taking a PCI function away from its host driver, quieting it, giving it back: through sysfs.

Configuration space is read and written through the function's sysfs ``config`` file, so the
host kernel's own access method and locking are used (never ports 0xCF8/0xCFC from here).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Protocol

from coreslice.errors import LaunchError

# PCI Local Bus 3.0 §6.2.2 (Command register), §6.7 (capability list); PCIe Base 5.0 §7.7.1 (MSI),
# §7.7.2 (MSI-X).
PCI_COMMAND = 0x04
COMMAND_BUS_MASTER = 1 << 2
COMMAND_INTX_DISABLE = 1 << 10  # with MSI off, a device must not fall back to INTx on the host's IOAPIC
PCI_STATUS = 0x06
STATUS_CAP_LIST = 1 << 4
PCI_CAP_PTR = 0x34
CAP_MSI, CAP_MSIX = 0x05, 0x11
MSI_ENABLE = 1 << 0       # MSI Message Control bit 0
MSIX_ENABLE = 1 << 15     # MSI-X Message Control bit 15
# The kernel's reset methods (sysfs reset_method, Linux >= 5.15) that reset this function alone:
# FLR (PCIe §6.6.2), Advanced Features FLR, and "bus": a secondary bus reset of its parent bridge,
# which the kernel offers only when the function is alone below it.
OWN_RESETS = ("flr", "af_flr", "bus")
# What a slice's function gets in driver_override while the slice has it: a name no driver has.
# The PCI core then matches the function to no driver (pci_match_device compares the override
# with the driver's name), so a drivers_probe, a rescan or a module loaded later (modprobe nvme,
# udev) cannot bind a host driver to a device the slice is driving and DMAing with.
OVERRIDE = "coreslice"


class PciControl(Protocol):
    def detach(self, address: str) -> str | None: ...
    def attach(self, address: str, driver: str | None) -> None: ...
    def quiesce(self, address: str) -> list[str]: ...
    def bus_master_off(self, address: str) -> bool: ...
    def reprobe(self, address: str) -> str | None: ...


def capabilities(config: bytes) -> dict[int, int]:
    """Capability ID -> offset of the first such capability in a config-space dump."""
    caps: dict[int, int] = {}
    if len(config) < 0x40 or not struct.unpack_from("<H", config, PCI_STATUS)[0] & STATUS_CAP_LIST:
        return caps
    ptr, seen = config[PCI_CAP_PTR] & ~3, set()
    while 0x40 <= ptr < min(len(config), 0x100) - 1 and ptr not in seen:  # a loop ends the walk
        seen.add(ptr)
        caps.setdefault(config[ptr], ptr)
        ptr = config[ptr + 1] & ~3
    return caps


class SysfsPci:
    def __init__(self, root: Path = Path("/")):
        self.root = root

    def _override(self, address: str, value: str) -> None:
        path = self.root / "sys/bus/pci/devices" / address / "driver_override"
        if path.exists():  # Linux >= 3.16
            try:
                path.write_text(value)
            except OSError as e:
                raise LaunchError(f"writing '{value.strip()}' to {path} failed: {e.strerror}") from e

    def detach(self, address: str) -> str | None:
        """Keep host drivers off the function (driver_override), unbind it from its driver and
        keep its decoding on; return the old driver."""
        dev = self.root / "sys/bus/pci/devices" / address
        driver = (dev / "driver").resolve().name if (dev / "driver").exists() else None
        self._override(address, OVERRIDE)  # first: no window in which a probe could rebind it
        if driver is not None:
            try:
                (dev / "driver/unbind").write_text(address)
            except OSError as e:
                self._override(address, "\n")
                raise LaunchError(f"unbinding {address} from {driver} failed: {e.strerror}") from e
        # Unbinding disables the device; enable it again so its I/O BAR keeps decoding for the slice.
        try:
            if (dev / "enable").read_text().strip() == "0":
                (dev / "enable").write_text("1")
        except OSError as e:
            raise LaunchError(f"enabling {address} (so that its I/O BAR decodes) failed: {e.strerror}") from e
        return driver

    def attach(self, address: str, driver: str | None) -> None:
        """Undo detach: host drivers allowed again, and the function bound back to ``driver``
        (None: it had none, so only the override goes)."""
        self._override(address, "\n")
        if driver is None:
            return
        try:
            (self.root / "sys/bus/pci/drivers" / driver / "bind").write_text(address)
        except OSError as e:
            raise LaunchError(f"binding {address} to {driver} failed: {e.strerror}") from e

    def _config_rw(self, address: str, offset: int, fmt: str, value: int | None = None) -> int:
        path = self.root / "sys/bus/pci/devices" / address / "config"
        fd = os.open(path, os.O_RDWR if value is not None else os.O_RDONLY)
        try:
            if value is not None:
                os.pwrite(fd, struct.pack(fmt, value), offset)
            return struct.unpack(fmt, os.pread(fd, struct.calcsize(fmt), offset))[0]
        finally:
            os.close(fd)

    def quiesce(self, address: str) -> list[str]:
        """Stop the function's DMA and interrupts: Bus Master Enable off, MSI and MSI-X off, then
        reset it alone (FLR, else its bridge's secondary bus) when the kernel offers such a
        method.  Returns what was done, in words."""
        dev = self.root / "sys/bus/pci/devices" / address
        done = []
        if not (dev / "config").exists():
            raise LaunchError(f"{address} is gone from the host (no {dev}/config: a removed VF or unplugged "
                              "device); nothing to quiet there")
        try:
            config = (dev / "config").read_bytes()
            cmd = self._config_rw(address, PCI_COMMAND, "<H")
            self._config_rw(address, PCI_COMMAND, "<H", (cmd & ~COMMAND_BUS_MASTER) | COMMAND_INTX_DISABLE)
            done.append("bus master off")
            caps = capabilities(config)
            for cap, bit, what in ((CAP_MSI, MSI_ENABLE, "MSI"), (CAP_MSIX, MSIX_ENABLE, "MSI-X")):
                if cap in caps:
                    ctl = self._config_rw(address, caps[cap] + 2, "<H")
                    if ctl & bit:
                        self._config_rw(address, caps[cap] + 2, "<H", ctl & ~bit)
                        done.append(f"{what} off")
        except OSError as e:
            raise LaunchError(f"quieting {address} through {dev}/config failed: {e.strerror}; its DMA may "
                              "still be on: run coreslice stop again, or reset the function by hand") from e
        done.append(self._reset_alone(address))
        return done

    def bus_master_off(self, address: str) -> bool:
        """Clear Bus Master Enable again; True when it had been set again since quiesce (the
        slice's driver, still running until its CPUs got the INIT, can re-enable it)."""
        try:
            cmd = self._config_rw(address, PCI_COMMAND, "<H")
            if cmd & COMMAND_BUS_MASTER:
                self._config_rw(address, PCI_COMMAND, "<H", cmd & ~COMMAND_BUS_MASTER)
                return True
        except OSError as e:
            raise LaunchError(f"clearing bus master of {address} again failed: {e.strerror}") from e
        return False

    def _reset_alone(self, address: str) -> str:
        dev = self.root / "sys/bus/pci/devices" / address
        try:
            offered = (dev / "reset_method").read_text().split()
        except OSError:
            offered = []  # no reset_method (kernel < 5.15) or no method at all
        own = [m for m in offered if m in OWN_RESETS]
        if not own:
            return f"no reset (the kernel offers {' '.join(offered) or 'none'} for it, none of its own alone)"
        try:
            # The kernel saves config space, resets, restores it: with bus master off as set above.
            (dev / "reset_method").write_text(" ".join(own))
            try:
                (dev / "reset").write_text("1")
            finally:
                (dev / "reset_method").write_text(" ".join(offered))
        except OSError as e:
            raise LaunchError(f"resetting {address} ({own[0]}) failed: {e.strerror}; bus master is off, "
                              "the function may still hold its last state") from e
        return f"reset ({own[0]})"

    def reprobe(self, address: str) -> str | None:
        """Let the host kernel bind its own driver to the function again; the driver's name."""
        dev = self.root / "sys/bus/pci/devices" / address
        try:
            if (dev / "driver_override").exists() and (dev / "driver_override").read_text().strip() not in ("", "(null)"):
                (dev / "driver_override").write_text("\n")
            if not (dev / "driver").exists():
                (self.root / "sys/bus/pci/drivers_probe").write_text(address)
        except OSError as e:
            raise LaunchError(f"giving {address} back to the host (drivers_probe) failed: {e.strerror}") from e
        return (dev / "driver").resolve().name if (dev / "driver").exists() else None


class FakePci:
    def __init__(self):
        self.detached: list[str] = []
        self.attached: list[tuple[str, str]] = []
        self.quiesced: list[str] = []
        self.again: list[str] = []  # bus_master_off after the INIT
        self.reprobed: list[str] = []

    def quiesce(self, address: str) -> list[str]:
        self.quiesced.append(address)
        return ["bus master off", "reset (flr)"]

    def bus_master_off(self, address: str) -> bool:
        self.again.append(address)
        return False

    def reprobe(self, address: str) -> str | None:
        self.reprobed.append(address)
        return None

    def detach(self, address: str) -> str | None:
        self.detached.append(address)
        return None

    def attach(self, address: str, driver: str | None) -> None:
        self.attached.append((address, driver))
