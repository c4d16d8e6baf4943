"""vm/vfio.py: IOMMU group checks, and binding to vfio-pci and back through a fake sysfs tree."""

from __future__ import annotations

import pytest

from coreslice.errors import LaunchError, UsageError
from coreslice.host.pci import Function, PciTopology
from coreslice.vm.vfio import SysfsVfio, check_groups

ETH, BRIDGE = 0x020000, 0x060400
NIC, NIC2, OTHER, PORT = "0000:21:00.0", "0000:21:00.1", "0000:22:00.0", "0000:20:00.0"


def topo(*funcs):
    return PciTopology(functions=[Function(a, c, driver=d, iommu_group=g) for a, c, d, g in funcs])


def test_function_in_its_own_group():
    t = topo((NIC, ETH, "igb", 7), (OTHER, ETH, "e1000e", 8), (PORT, BRIDGE, "pcieport", 8))
    assert check_groups([NIC], t) == {NIC: 7}


def test_unknown_address():
    with pytest.raises(UsageError, match="0000:99:00.0 is not on this host"):
        check_groups(["0000:99:00.0"], topo((NIC, ETH, "igb", 7)))


def test_no_iommu_group():
    with pytest.raises(UsageError, match="intel_iommu=on"):
        check_groups([NIC], topo((NIC, ETH, "igb", None)))


def test_group_shared_with_a_host_driven_endpoint():
    t = topo((NIC, ETH, "igb", 7), (OTHER, ETH, "e1000e", 7))
    with pytest.raises(UsageError, match=f"shares IOMMU group 7 with {OTHER} \\(driver e1000e\\)"):
        check_groups([NIC], t)


@pytest.mark.parametrize("neighbour", [(PORT, BRIDGE, "pcieport", 7), (PORT, BRIDGE, None, 7),
                                       (OTHER, ETH, "vfio-pci", 7), (OTHER, ETH, "pci-stub", 7)])
def test_group_shared_with_neutral_members(neighbour):
    assert check_groups([NIC], topo((NIC, ETH, "igb", 7), neighbour)) == {NIC: 7}


def test_group_whose_endpoints_are_all_given():
    t = topo((NIC, ETH, "igb", 7), (NIC2, ETH, "igb", 7), (PORT, BRIDGE, "pcieport", 7))
    assert check_groups([NIC, NIC2], t) == {NIC: 7, NIC2: 7}


def test_bridge_given():
    with pytest.raises(UsageError, match=f"{PORT} is a bridge"):
        check_groups([PORT], topo((PORT, BRIDGE, "pcieport", 7)))


class FakeKernel(SysfsVfio):
    """Records every sysfs write and rebinds as the kernel would: drivers_probe binds to
    driver_override when set, else to the device's native driver."""

    def __init__(self, root, native):
        super().__init__(root)
        self.native, self.writes, self.probe_to = native, [], None

    def _link(self, address, drv):
        link = self._dev(address) / "driver"
        link.unlink(missing_ok=True)
        if drv is not None:
            link.symlink_to(self.root / "sys/bus/pci/drivers" / drv)

    def _w(self, path, text, what):
        rel = str(path.relative_to(self.root))
        self.writes.append((rel, text))
        addr = text.strip()
        if rel.endswith("/driver_override"):
            path.write_text(text)
        elif rel.endswith("/driver/unbind"):
            self._link(rel.split("/")[4], None)
        elif rel.endswith("/bind"):
            self._link(addr, rel.split("/")[4])
        elif rel == "sys/bus/pci/drivers_probe":
            override = (self._dev(addr) / "driver_override").read_text().strip()
            self._link(addr, self.probe_to or override or self.native[addr])


def tree(root, driver="igb", vfio_loaded=True, group=7):
    drivers = root / "sys/bus/pci/drivers"
    for d in ("igb", "e1000e") + (("vfio-pci",) if vfio_loaded else ()):
        (drivers / d).mkdir(parents=True)
    (root / "sys/bus/pci/drivers_probe").write_text("")
    dev = root / "sys/bus/pci/devices" / NIC
    dev.mkdir(parents=True)
    (dev / "driver_override").write_text("(null)\n")
    if driver:
        (dev / "driver").symlink_to(drivers / driver)
    if group is not None:
        (root / "dev/vfio").mkdir(parents=True)
        (root / "dev/vfio" / str(group)).touch()
    return FakeKernel(root, {NIC: "igb"})


def test_bind_overrides_unbinds_then_probes(tmp_path):
    k = tree(tmp_path)
    assert k.bind(NIC, 7) == "igb"
    dev = f"sys/bus/pci/devices/{NIC}"
    assert k.writes == [(f"{dev}/driver_override", "vfio-pci"), (f"{dev}/driver/unbind", NIC),
                        ("sys/bus/pci/drivers_probe", NIC)]
    assert k.driver(NIC) == "vfio-pci"


def test_bind_of_an_unbound_function(tmp_path):
    k = tree(tmp_path, driver=None)
    assert k.bind(NIC, 7) is None
    assert [w[0].rsplit("/", 1)[-1] for w in k.writes] == ["driver_override", "drivers_probe"]


def test_bind_without_vfio_pci_loaded(tmp_path):
    k = tree(tmp_path, vfio_loaded=False)
    with pytest.raises(LaunchError, match="modprobe vfio-pci"):
        k.bind(NIC, 7)
    assert k.writes == []


def test_bind_that_does_not_end_on_vfio_pci(tmp_path):
    k = tree(tmp_path)
    k.probe_to = "e1000e"
    with pytest.raises(LaunchError, match="did not bind to vfio-pci \\(it is bound to e1000e\\)"):
        k.bind(NIC, 7)


def test_bind_without_the_group_device_node(tmp_path):
    k = tree(tmp_path, group=None)
    with pytest.raises(LaunchError, match="/dev/vfio/7 does not exist"):
        k.bind(NIC, 7)


def test_unbind_gives_the_function_back_to_its_driver(tmp_path):
    k = tree(tmp_path)
    k.bind(NIC, 7)
    k.writes.clear()
    assert k.unbind(NIC, "igb") == "igb"
    dev = f"sys/bus/pci/devices/{NIC}"
    assert k.writes == [(f"{dev}/driver/unbind", NIC), (f"{dev}/driver_override", "\n"),
                        ("sys/bus/pci/drivers/igb/bind", NIC)]
    assert (tmp_path / dev / "driver_override").read_text().strip() == ""


def test_unbind_of_a_function_that_had_no_driver_probes(tmp_path):
    k = tree(tmp_path, driver=None)
    k.bind(NIC, 7)
    k.writes.clear()
    assert k.unbind(NIC, None) == "igb"  # the host's drivers probe it: its native one takes it
    assert k.writes[-1] == ("sys/bus/pci/drivers_probe", NIC)
