"""SysfsPci.quiesce/reprobe against a sysfs tree of regular files (config space as a file)."""

from __future__ import annotations

import struct

import pytest

from coreslice.machine.pci import (CAP_MSI, CAP_MSIX, COMMAND_BUS_MASTER, MSI_ENABLE, MSIX_ENABLE, SysfsPci,
                                   capabilities)

ADDR = "0000:21:10.0"


def config_space(*, msi_on=True, msix_on=True) -> bytearray:
    c = bytearray(256)
    struct.pack_into("<HH", c, 0, 0x8086, 0x10CA)
    struct.pack_into("<H", c, 0x04, 0x0002 | COMMAND_BUS_MASTER)  # memory space, bus master
    struct.pack_into("<H", c, 0x06, 1 << 4)  # capability list
    c[0x34] = 0x50
    c[0x50:0x52] = bytes([0x01, 0x70])  # power management -> 0x70
    c[0x70:0x72] = bytes([CAP_MSI, 0xA0])
    struct.pack_into("<H", c, 0x72, 0x0080 | (MSI_ENABLE if msi_on else 0))
    c[0xA0:0xA2] = bytes([CAP_MSIX, 0x00])
    struct.pack_into("<H", c, 0xA2, 0x0002 | (MSIX_ENABLE if msix_on else 0))
    return c


@pytest.fixture
def dev(tmp_path):
    d = tmp_path / "sys/bus/pci/devices" / ADDR
    d.mkdir(parents=True)
    (d / "config").write_bytes(config_space())
    (d / "reset_method").write_text("pm flr bus\n")
    (d / "reset").write_text("")
    return d


def test_capabilities_walk_stops_on_a_loop():
    c = config_space()
    assert capabilities(bytes(c)) == {0x01: 0x50, CAP_MSI: 0x70, CAP_MSIX: 0xA0}
    c[0xA1] = 0x50  # MSI-X points back to the first capability
    assert capabilities(bytes(c)) == {0x01: 0x50, CAP_MSI: 0x70, CAP_MSIX: 0xA0}


def test_quiesce_turns_off_dma_and_interrupts_then_resets_with_flr(dev, tmp_path):
    done = SysfsPci(tmp_path).quiesce(ADDR)
    assert done == ["bus master off", "MSI off", "MSI-X off", "reset (flr)"]
    c = (dev / "config").read_bytes()
    assert not struct.unpack_from("<H", c, 0x04)[0] & COMMAND_BUS_MASTER
    assert struct.unpack_from("<H", c, 0x04)[0] == 0x0402 | 1 << 10  # the rest kept, INTx disabled
    assert struct.unpack_from("<H", c, 0x72)[0] == 0x0080 and struct.unpack_from("<H", c, 0xA2)[0] == 0x0002
    assert (dev / "reset").read_text() == "1"
    assert (dev / "reset_method").read_text().split() == ["pm", "flr", "bus"]  # as it was


def test_quiesce_without_an_own_reset_says_so(dev, tmp_path):
    (dev / "reset_method").write_text("pm\n")
    done = SysfsPci(tmp_path).quiesce(ADDR)
    assert done[-1].startswith("no reset (the kernel offers pm") and (dev / "reset").read_text() == ""


def test_reprobe_clears_the_override_and_asks_the_host_kernel(dev, tmp_path):
    (dev / "driver_override").write_text("vfio-pci\n")
    (tmp_path / "sys/bus/pci/drivers_probe").write_text("")
    assert SysfsPci(tmp_path).reprobe(ADDR) is None  # no kernel here to bind one
    assert (dev / "driver_override").read_text() == "\n"
    assert (tmp_path / "sys/bus/pci/drivers_probe").read_text() == ADDR


def test_quiesce_of_a_function_gone_from_the_host_says_so(tmp_path):
    from coreslice.errors import LaunchError

    with pytest.raises(LaunchError, match="is gone from the host"):
        SysfsPci(tmp_path).quiesce("0000:99:00.0")


def test_detach_keeps_host_drivers_off_until_attach_gives_it_back(dev, tmp_path):
    """While a slice has the function its driver_override names no driver, so no probe, rescan
    or later modprobe binds a host driver to it; attach clears it before binding back."""
    drv = tmp_path / "sys/bus/pci/drivers/serial"
    drv.mkdir(parents=True)
    (drv / "unbind").write_text("")
    (drv / "bind").write_text("")
    (dev / "driver").symlink_to(drv)
    (dev / "driver_override").write_text("\n")
    (dev / "enable").write_text("0")
    pci = SysfsPci(tmp_path)
    assert pci.detach(ADDR) == "serial"
    assert (dev / "driver_override").read_text() == "coreslice" and (drv / "unbind").read_text() == ADDR
    assert (dev / "enable").read_text() == "1"
    pci.attach(ADDR, "serial")
    assert (dev / "driver_override").read_text() == "\n" and (drv / "bind").read_text() == ADDR


def test_a_failed_unbind_leaves_no_override(dev, tmp_path, monkeypatch):
    from coreslice.errors import LaunchError

    drv = tmp_path / "sys/bus/pci/drivers/serial"
    drv.mkdir(parents=True)
    (drv / "unbind").mkdir()  # writing it fails (EISDIR)
    (dev / "driver").symlink_to(drv)
    (dev / "driver_override").write_text("\n")
    with pytest.raises(LaunchError, match="unbinding 0000:21:10.0 from serial failed"):
        SysfsPci(tmp_path).detach(ADDR)
    assert (dev / "driver_override").read_text() == "\n"


def test_bus_master_off_again_says_whether_it_had_been_set_again(dev, tmp_path):
    pci = SysfsPci(tmp_path)
    pci.quiesce(ADDR)
    assert pci.bus_master_off(ADDR) is False  # nothing set it since
    c = bytearray((dev / "config").read_bytes())
    struct.pack_into("<H", c, 0x04, struct.unpack_from("<H", c, 0x04)[0] | COMMAND_BUS_MASTER)
    (dev / "config").write_bytes(c)  # the slice's driver turned it on again before its INIT
    assert pci.bus_master_off(ADDR) is True
    assert not struct.unpack_from("<H", (dev / "config").read_bytes(), 0x04)[0] & COMMAND_BUS_MASTER
