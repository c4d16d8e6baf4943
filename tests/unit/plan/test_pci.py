"""`coreslice boot` with PCI functions: the plan, the slice's tables, and every refusal.

The host tree (hosttree.py) has two roots: bus 0 (00-1f: the UART 0000:00:03.0, a NIC 0000:00:02.0)
and bus 0x20 (root port 0000:20:00.0, SR-IOV NIC 0000:21:00.0 bound to igb, its VF 0000:21:10.0);
its MCFG covers segment 0 buses 00-ff at 0xb0000000.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from coreslice.launch import session as launch
from coreslice.acpi import acpica
from coreslice.acpi.tables import McfgAllocation, build_mcfg, parse_mcfg
from coreslice.boot.zeropage import E820Type
from coreslice.host.snapshot import discover
from coreslice.machine.pci import FakePci
from coreslice.plan.boot import PCI_PARAMS

from ..hosttree import ROOT_PORT, SRIOV_NIC, SRIOV_VF, add_pci_function
from ..plan.test_boot import Fakes, refused, spec  # noqa: F401 (spec is a fixture)

ECAM_20 = (0xB0000000 + (0x20 << 20), 2 << 20)  # buses 20-21 of the MCFG allocation at 0xb0000000


class OrderedFakes(Fakes):
    """Records how many memory writes had happened when each function was detached."""

    def __init__(self):
        super().__init__()
        mem, detached_at = self.mem, []
        self.detached_at = detached_at

        class Pci(FakePci):
            def detach(self, address):
                detached_at.append((address, len(mem.writes)))
                return super().detach(address)
        self.pci = Pci()


def boot(spec, tree, fakes=None):
    fakes = fakes or OrderedFakes()
    return launch.boot(spec, host=discover(tree), machine=fakes.machine()), fakes


def table(result, signature: str) -> bytes:
    """A table the slice gets, cut from the ACPI segment."""
    seg = next(s for s in result.image.segments if s.name == "acpi")
    off = result.image.acpi_tables[signature] - seg.addr
    length = int.from_bytes(seg.data[off + 4:off + 8], "little")
    return seg.data[off:off + length]


def test_device_gets_its_root_ecam_and_pci_parameters(spec, host_tree):
    result, fakes = boot(dataclasses.replace(spec, devices=["21:00.0"]), host_tree)
    plan = result.plan
    assert [r.name for r in plan.pci.roots] == ["0000:20"]
    assert [(f.address, f.role, f.driver) for f in plan.pci.functions] == [(SRIOV_NIC, "device", "igb")]
    # pci=off gives way to the options that keep the slice on its own root.
    assert PCI_PARAMS in plan.cmdline and "pci=off" not in plan.cmdline
    assert "pcie_ports=compat" in plan.cmdline.split()  # no port services (MSI-X) on shared root ports
    # The MCFG is cut to the root's buses, and exactly that ECAM range is reserved in the e820 map.
    assert plan.mcfg == [McfgAllocation(0xB0000000, 0, 0x20, 0x21)]
    assert parse_mcfg(table(result, "MCFG")) == plan.mcfg
    assert [(e.addr, e.size) for e in plan.e820 if e.type == E820Type.RESERVED and e.addr == ECAM_20[0]] == [ECAM_20]
    # The DSDT lists that root alone, with its windows.
    dsl = acpica.disassemble(table(result, "DSDT"))
    assert "Name (_BBN, 0x20)" in dsl and dsl.count("PNP0A08") == 1
    assert "0xFE800000" in dsl and "0x000000C800000000" in dsl and "0xD000" in dsl
    assert "Device (PC00)" in result.image.dsdt_asl
    # Unbound from igb before the first memory write.
    assert fakes.detached_at == [(SRIOV_NIC, 0)] and fakes.mem.writes
    assert result.to_json()["plan"]["pci"]["roots"][0]["name"] == "0000:20"


def test_virtual_function_and_pci_console_share_nothing(spec, host_tree):
    """A VF is a function like any other; a PCI console counts as assigned and brings its root."""
    result, fakes = boot(dataclasses.replace(spec, devices=[SRIOV_VF], console="0000:00:03.0"), host_tree)
    plan = result.plan
    assert [r.name for r in plan.pci.roots] == ["0000:00", "0000:20"]
    assert {f.address: f.role for f in plan.pci.functions} == {"0000:00:03.0": "console", SRIOV_VF: "device"}
    assert plan.mcfg == [McfgAllocation(0xB0000000, 0, 0, 0x1F), McfgAllocation(0xB0000000, 0, 0x20, 0x21)]
    # Adjacent ECAM ranges of the two roots make one reserved e820 entry (the kernel would merge them).
    assert [(e.addr, e.size) for e in plan.e820 if e.addr >= 0xB0000000] == [(0xB0000000, 0x22 << 20)]
    assert [a for a, _ in fakes.detached_at] == ["0000:00:03.0", SRIOV_VF]
    assert all(n == 0 for _, n in fakes.detached_at)


def test_without_devices_nothing_changes(spec, host_tree):
    result, fakes = boot(spec, host_tree)
    assert result.plan.pci is None and "pci=off" in result.plan.cmdline
    assert result.plan.mcfg == [McfgAllocation(0xB0000000, 0, 0, 0xFF)] and fakes.detached_at == []


@pytest.mark.parametrize("devices, console, match", [
    (["zz:00"], "io:0x2f8", "'zz:00' is not a PCI address"),
    ([SRIOV_NIC, "21:00.0"], "io:0x2f8", f"device {SRIOV_NIC} is given twice"),
    (["0000:00:03.0"], "0000:00:03.0", "device 0000:00:03.0 is also the --console"),
    (["0000:21:05.0"], "io:0x2f8", "device 0000:21:05.0: no such PCI function"),
    ([ROOT_PORT], "io:0x2f8", rf"device {ROOT_PORT} is a bridge \(class 0x060400\)"),
])
def test_bad_devices(spec, host_tree, devices, console, match):
    refused(spec, host_tree, match, devices=devices, console=console)


def test_device_is_the_hosts_console(spec, host_tree):
    (host_tree / "sys/bus/pci/devices/0000:00:03.0/tty/ttyS4").mkdir(parents=True)
    (host_tree / "proc/consoles").write_text("ttyS4                -W- (EC p a)    4:68\n")
    (host_tree / "sys/class/tty/ttyS4").mkdir()
    for name, value in (("port", "0xC000"), ("type", "4"), ("io_type", "0")):
        (host_tree / "sys/class/tty/ttyS4" / name).write_text(value + "\n")
    refused(spec, host_tree, r"device 0000:00:03.0 is the host's own console \(ttyS4\)", devices=["00:03.0"])


def test_device_under_no_known_root(spec, host_tree):
    add_pci_function(host_tree, "pci0000:40/0000:40:00.0", 0x010802, driver="nvme")
    refused(spec, host_tree, "device 0000:40:00.0 is under no known PCI root complex", devices=["0000:40:00.0"])


def test_root_shared_with_a_host_driver(spec, host_tree):
    """Bus 0 also holds a function the host drives: giving the root away would hand it over too."""
    add_pci_function(host_tree, "pci0000:00/0000:00:04.0", 0x010802, driver="nvme")
    msg = refused(spec, host_tree, r"PCI root 0000:00 \(buses 00-1f\) that holds 0000:00:03.0 also holds "
                                   r"0000:00:04.0 \(nvme\), driven by the host", console="0000:00:03.0")
    assert "unbind those" in msg


def test_bus_without_ecam(spec, host_tree):
    (host_tree / "sys/firmware/acpi/tables/MCFG").write_bytes(build_mcfg([McfgAllocation(0xB0000000, 0, 0, 0x1F)]))
    refused(spec, host_tree, "bus 0000:21 \\(root 0000:20\\) has no ECAM region in the host's MCFG", devices=[SRIOV_NIC])


def test_cli_device_flag(tmp_path, host_tree, debian_kernel, initrd, capsys):  # noqa: F811
    import json

    from coreslice import cli
    out = tmp_path / "out"
    rc = cli.main(["boot", "--kernel", str(debian_kernel.vmlinuz), "--initrd", str(initrd), "--cpus", "1-2",
                   "--memory", "512M@0x40000000", "--console", "io:0x2f8", "--device", "0000:21:00.0",
                   "--host-root", str(host_tree), "--dry-run", str(out), "--json"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out)
    assert doc["plan"]["pci"]["functions"] == [{"address": SRIOV_NIC, "role": "device", "driver": "igb",
                                                "root": "0000:20"}]
    assert "Name (_BBN, 0x20)" in (out / "dsdt.asl").read_text()
    rc = cli.main(["boot", "--kernel", str(debian_kernel.vmlinuz), "--cpus", "1-2", "--memory", "512M@0x40000000",
                   "--console", "io:0x2f8", "--device", ROOT_PORT, "--host-root", str(host_tree),
                   "--dry-run", str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "is a bridge" in err and not (tmp_path / "out2").exists()


# --- the emulated machine, captured (tests/fixtures/hosts/qemu-q35-pxb) ------------------------

PXB_HOST = Path(__file__).resolve().parents[2] / "fixtures/hosts/qemu-q35-pxb"


def test_emulated_console_on_a_pxb_root_bus(spec):
    """The testbed's pxb UART 0000:41:00.0: its root 0000:40 alone, ECAM buses 40-41 reserved."""
    s = dataclasses.replace(spec, console="0000:41:00.0", cpus=[1])
    result, fakes = boot(s, PXB_HOST)
    plan = result.plan
    assert plan.console.port == 0xD000 and [r.name for r in plan.pci.roots] == ["0000:40"]
    assert plan.mcfg == [McfgAllocation(0xB0000000, 0, 0x40, 0x41)]
    assert (0xB4000000, 2 << 20, E820Type.RESERVED) in [(e.addr, e.size, e.type) for e in plan.e820]
    assert fakes.detached_at == [("0000:41:00.0", 0)]


def test_emulated_bus0_console_is_refused(spec):
    """The bus-0 UART shares its root with the host's virtio functions."""
    refused(spec, PXB_HOST, r"PCI root 0000:00 \(buses 00-1f\) that holds 0000:00:10.0 also holds "
                            r"0000:00:01.0 \(virtio-pci\), 0000:00:02.0 \(virtio-pci\)",
            console="0000:00:10.0", cpus=[1], host=discover(PXB_HOST))


@pytest.mark.parametrize("mounts, swaps, what", [
    ("/dev/nvme0n1p1 /boot ext4 rw 0 0\n", "", "/boot"),
    ("", "Filename Type Size Used Priority\n/dev/nvme0n1p1 partition 1 0 -2\n", "swap"),
])
def test_device_holding_host_storage(spec, host_tree, mounts, swaps, what):
    """A disk controller behind the host's mounted file systems or swap is never a slice's."""
    dev = host_tree / "sys/devices/pci0000:20/0000:20:00.0/0000:21:00.0/nvme/nvme0/nvme0n1/nvme0n1p1"
    dev.mkdir(parents=True)
    (host_tree / "sys/class/block").mkdir(parents=True)
    (host_tree / "sys/class/block/nvme0n1p1").symlink_to(
        "../../devices/pci0000:20/0000:20:00.0/0000:21:00.0/nvme/nvme0/nvme0n1/nvme0n1p1")
    (host_tree / "proc/mounts").write_text("proc /proc proc rw 0 0\n" + mounts)
    (host_tree / "proc/swaps").write_text(swaps or "Filename Type Size Used Priority\n")
    assert discover(host_tree).storage_functions == {SRIOV_NIC: [what]}
    refused(spec, host_tree, rf"device {SRIOV_NIC} holds the host's own storage \(mounted: {what}\)",
            devices=[SRIOV_NIC])


def test_shared_root_is_fine_for_a_kernel_that_probes_only_what_it_is_permitted(spec, host_tree):
    """The prototype's slice kernel probes only permit_probe_only functions: a root that also
    holds host-driven functions may be exposed to it (not to a stock kernel, see above)."""
    add_pci_function(host_tree, "pci0000:00/0000:00:04.0", 0x010802, driver="nvme")
    extra = {"pci_extra": ",permit_probe_only=00:03.0"}
    result, _ = boot(dataclasses.replace(spec, console="0000:00:03.0", extra=extra), host_tree)
    assert [r.name for r in result.plan.pci.roots] == ["0000:00"]
    assert PCI_PARAMS + ",noearly,permit_probe_only=00:03.0" in result.plan.cmdline


def _iommu_group(tree: Path, address: str, group: int) -> None:
    """What the kernel makes when its IOMMU translates DMA: a device's iommu_group link."""
    (tree / "sys/kernel/iommu_groups" / str(group) / "devices").mkdir(parents=True, exist_ok=True)
    dev = Path(os.path.realpath(tree / "sys/bus/pci/devices" / address))
    (dev / "iommu_group").symlink_to(tree / "sys/kernel/iommu_groups" / str(group))


def test_iommu_group_shared_with_a_host_function_is_refused(spec, host_tree):
    """The slice's NIC and a host-driven NVMe in one IOMMU group (no ACS between them): refused,
    naming the host's member; the root port, bound to pcieport, does not count."""
    add_pci_function(host_tree, "pci0000:20/0000:20:00.0/0000:21:00.1", 0x010802, driver="nvme")
    for addr in (ROOT_PORT, SRIOV_NIC, "0000:21:00.1"):
        _iommu_group(host_tree, addr, 7)
    assert discover(host_tree).pci.function(SRIOV_NIC).iommu_group == 7
    fakes = OrderedFakes()
    msg = refused(spec, host_tree, r"PCI function 0000:21:00.0 shares IOMMU group 7 with 0000:21:00.1 "
                                   r"\(driver nvme\), which the slice is not given", fakes=fakes,
                  devices=[SRIOV_NIC], extra={"pci_extra": ",permit_probe_only=0000:21:00.0"})
    assert "give the slice every function of the group" in msg


def test_translating_iommu_plans_a_function_in_a_group_of_its_own(spec, host_tree):
    """Its domain is built at launch (launch/dmahold.py, tests/unit/launch/test_dmahold.py)."""
    _iommu_group(host_tree, SRIOV_NIC, 3)
    result, _ = boot(dataclasses.replace(spec, devices=[SRIOV_NIC], extra={"pci_extra": ",permit_probe_only=0000:21:00.0"}),
                     host_tree)
    assert [f.address for f in result.plan.pci.devices] == [SRIOV_NIC]
