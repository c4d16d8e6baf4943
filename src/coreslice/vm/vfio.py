"""PCI functions passed to a comparison VM: checked against their IOMMU groups, bound to vfio-pci
for the VM's life, given back to the host's drivers afterwards.

VFIO hands a whole IOMMU group to one user (Documentation/driver-api/vfio.rst, "Groups, Devices,
and IOMMUs"): QEMU can open the group only when every endpoint in it is bound to vfio-pci (or to
no driver, or pci-stub); bridges (pcieport) may stay.  So a group that mixes the VM's function
with one the host drives is refused up front rather than failing inside QEMU.  Binding uses
driver_override (Linux >= 3.16), which makes the next probe pick vfio-pci whatever the device's
IDs, and never new_id, which would capture every function with the same IDs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from coreslice.errors import LaunchError, UsageError
from coreslice.host.pci import PciTopology

VFIO = "vfio-pci"


def check_groups(given: Sequence[str], topo: PciTopology) -> dict[str, int]:
    """Each function's IOMMU group; UsageError for a function the host does not have, for a host
    whose IOMMU does not translate (VFIO needs one), and for a group shared with a function the
    host drives."""
    groups: dict[str, int] = {}
    mine = set(given)
    for addr in given:
        f = topo.function(addr)
        if f is None:
            raise UsageError(f"PCI function {addr} is not on this host (coreslice host show lists its functions); "
                             "give one of its addresses to --device")
        if f.is_bridge:
            raise UsageError(f"{addr} is a bridge; pass endpoints (the functions below it) to the VM")
        if f.iommu_group is None:
            raise UsageError(f"{addr} is in no IOMMU group: the host's IOMMU does not translate, and vfio-pci needs "
                             "it to; boot the host in its VM profile (coreslice host configure --profile vm-host: "
                             "intel_iommu=on) or run the VM without --device")
        names = topo.group_mates_in_use(f.iommu_group, mine)
        if names:
            raise UsageError(f"PCI function {addr} shares IOMMU group {f.iommu_group} with {names}, which stays with "
                             "the host: VFIO gives a whole group to one user; pass every endpoint of the group "
                             "(--device), or a function in a group of its own")
        groups[addr] = f.iommu_group
    return groups


class SysfsVfio:
    """Bind and unbind through /sys/bus/pci (``root`` lets tests use a fake tree)."""

    def __init__(self, root: Path = Path("/")):
        self.root = root

    def _dev(self, address: str) -> Path:
        return self.root / "sys/bus/pci/devices" / address

    def driver(self, address: str) -> str | None:
        link = self._dev(address) / "driver"
        return link.resolve().name if link.exists() else None

    def _w(self, path: Path, text: str, what: str) -> None:
        try:
            path.write_text(text)
        except OSError as e:
            raise LaunchError(f"{what} failed ({path}: {e.strerror})") from e

    def bind(self, address: str, group: int) -> str | None:
        """Bind ``address`` to vfio-pci; returns the driver it had.  The group's device node must
        then exist, or QEMU could not open it."""
        if not (self.root / "sys/bus/pci/drivers" / VFIO).is_dir():
            raise LaunchError("the vfio-pci driver is not loaded; run modprobe vfio-pci (coreslice host check "
                              "--profile vm-host lists what the VM host needs)")
        old = self.driver(address)
        if old == VFIO:
            return old
        dev = self._dev(address)
        self._w(dev / "driver_override", VFIO, f"setting driver_override of {address} to {VFIO}")
        if old is not None:
            self._w(dev / "driver/unbind", address, f"unbinding {address} from {old}")
        self._w(self.root / "sys/bus/pci/drivers_probe", address, f"probing {address} with {VFIO}")
        now = self.driver(address)
        if now != VFIO:
            raise LaunchError(f"{address} did not bind to {VFIO} (it is bound to {now or 'no driver'}); "
                              "see the host's kernel log (dmesg) for why")
        if not (self.root / "dev/vfio" / str(group)).exists():
            raise LaunchError(f"{address} is bound to {VFIO} but /dev/vfio/{group} does not exist; "
                              "is udev running?")
        return old

    def unbind(self, address: str, old: str | None) -> str | None:
        """Give ``address`` back: off vfio-pci, driver_override cleared, the host's driver probed
        again (the one it had, when it had one).  Returns the driver it is bound to now."""
        dev = self._dev(address)
        if self.driver(address) == VFIO:
            self._w(dev / "driver/unbind", address, f"unbinding {address} from {VFIO}")
        self._w(dev / "driver_override", "\n", f"clearing driver_override of {address}")
        if old is not None and old != VFIO:
            self._w(self.root / "sys/bus/pci/drivers" / old / "bind", address, f"binding {address} back to {old}")
        else:
            self._w(self.root / "sys/bus/pci/drivers_probe", address, f"probing {address} with the host's drivers")
        return self.driver(address)
