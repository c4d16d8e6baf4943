"""Taking a PCI function away from its host driver, through sysfs."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from coreslice.errors import LaunchError


class PciControl(Protocol):
    def detach(self, address: str) -> str | None: ...
    def attach(self, address: str, driver: str) -> None: ...


class SysfsPci:
    def __init__(self, root: Path = Path("/")):
        self.root = root

    def detach(self, address: str) -> str | None:
        """Unbind the function from its driver and keep its decoding on; return the old driver."""
        dev = self.root / "sys/bus/pci/devices" / address
        driver = None
        if (dev / "driver").exists():
            driver = (dev / "driver").resolve().name
            try:
                (dev / "driver/unbind").write_text(address)
            except OSError as e:
                raise LaunchError(f"unbinding {address} from {driver} failed: {e.strerror}") from e
        # Unbinding disables the device; enable it again so its I/O BAR keeps decoding for the slice.
        try:
            if (dev / "enable").read_text().strip() == "0":
                (dev / "enable").write_text("1")
        except OSError as e:
            raise LaunchError(f"enabling {address} (so that its I/O BAR decodes) failed: {e.strerror}") from e
        return driver

    def attach(self, address: str, driver: str) -> None:
        """Give the function back to ``driver`` (undoing detach)."""
        try:
            (self.root / "sys/bus/pci/drivers" / driver / "bind").write_text(address)
        except OSError as e:
            raise LaunchError(f"binding {address} to {driver} failed: {e.strerror}") from e


class FakePci:
    def __init__(self):
        self.detached: list[str] = []
        self.attached: list[tuple[str, str]] = []

    def detach(self, address: str) -> str | None:
        self.detached.append(address)
        return None

    def attach(self, address: str, driver: str) -> None:
        self.attached.append((address, driver))
