"""QEMU command-line building for the testbed (xAPIC and x2APIC hosts)."""

import time
from pathlib import Path

import pytest

from coreslice.errors import UsageError
from coreslice.testbed import qemu
from coreslice.testbed.qemu import MachineConfig, QemuMachine, Share, host_append


def _cmd(**kw):
    cfg = MachineConfig(kernel=Path("/k/vmlinuz"), initrd=Path("/k/initrd"), append="A B", **kw)
    m = QemuMachine(cfg, Path("/runs/r1"))
    return m, m.command()


def _pairs(cmd, flag):
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


def test_xapic_command_line():
    m, cmd = _cmd(
        smp=4, memory="6G", cpu_model="max",
        shares=(Share("hostroot", Path("/")), Share("run", Path("/runs/r1"), readonly=False)),
    )
    assert cmd[0] == "qemu-system-x86_64"
    assert _pairs(cmd, "-machine") == ["q35"]
    assert _pairs(cmd, "-accel") == ["tcg"]
    assert _pairs(cmd, "-cpu") == ["max"]
    assert _pairs(cmd, "-smp") == ["4"]
    assert _pairs(cmd, "-m") == ["6G"]
    assert "-no-reboot" in cmd and "-nodefaults" in cmd
    assert _pairs(cmd, "-display") == ["none"]
    assert _pairs(cmd, "-kernel") == ["/k/vmlinuz"]
    assert _pairs(cmd, "-initrd") == ["/k/initrd"]
    assert _pairs(cmd, "-append") == ["A B"]
    assert not any("intel-iommu" in d for d in _pairs(cmd, "-device"))
    # Host console: COM1 -> file.
    assert "file,id=con0,path=/runs/r1/console-host.log" in _pairs(cmd, "-chardev")
    assert _pairs(cmd, "-serial") == ["chardev:con0"]
    fsdev = _pairs(cmd, "-fsdev")
    assert fsdev[0] == "local,id=fs0,path=/,security_model=none,multidevs=remap,readonly=on"
    assert fsdev[1].startswith("local,id=fs1,path=/runs/r1,security_model=none")
    assert "readonly" not in fsdev[1]
    nine = [d for d in _pairs(cmd, "-device") if d.startswith("virtio-9p-pci")]
    assert nine[:2] == ["virtio-9p-pci,fsdev=fs0,mount_tag=hostroot,ioeventfd=off",
                        "virtio-9p-pci,fsdev=fs1,mount_tag=run,ioeventfd=off"]


def test_slice_uarts_each_log_to_own_file():
    m, cmd = _cmd()
    devices = _pairs(cmd, "-device")
    isa = [d for d in devices if d.startswith("isa-serial")]
    assert [d.split(",", 2)[2] for d in isa] == [
        "iobase=0x2f8,irq=3", "iobase=0x3e8,irq=4", "iobase=0x2e8,irq=3",
    ]
    pci = [d for d in devices if d.startswith("pci-serial")]
    assert pci[0] == "pci-serial,chardev=slicecon3,bus=pcie.0,addr=0x10"
    assert len(pci) == 4
    logs = [c.split("path=")[1] for c in _pairs(cmd, "-chardev")]
    assert len(set(logs)) == len(logs) == 8
    assert m.pci_serial.pci_address == "0000:00:10.0"
    assert [p.console_arg for p in m.serial_ports] == [
        "io:0x2f8", "io:0x3e8", "io:0x2e8", "0000:00:10.0", "0000:21:00.0", "0000:41:00.0", "0000:61:00.0"]


def test_pxb_root_buses_each_hold_a_root_port_and_a_uart():
    """pxb-pcie takes only bridges: root bus N -> root port N:00.0 -> UART (N+1):00.0."""
    m, cmd = _cmd()
    devices = _pairs(cmd, "-device")
    for i, (bus, slot) in enumerate(((0x20, 0x11), (0x40, 0x12), (0x60, 0x13)), start=1):
        pxb = f"pxb-pcie,id=pxb{i},bus_nr={bus:#x},bus=pcie.0,addr={slot:#x}"
        rp = f"pcie-root-port,id=pxb{i}rp,bus=pxb{i},chassis={bus:#x},slot=0,addr=0x0"
        uart = f"pci-serial,chardev=slicecon{3 + i},bus=pxb{i}rp,addr=0x0"
        assert devices.index(pxb) < devices.index(rp) < devices.index(uart)
        assert f"file,id=slicecon{3 + i},path=/runs/r1/console-pxb{i}.log" in _pairs(cmd, "-chardev")
    ports = m.pxb_serials
    assert [(p.name, p.root_bus, p.pci_address) for p in ports] == [
        ("pxb1", "0000:20", "0000:21:00.0"), ("pxb2", "0000:40", "0000:41:00.0"),
        ("pxb3", "0000:60", "0000:61:00.0")]
    d = ports[0].describe()
    assert d["kind"] == "pxb" and d["root_port"] == "0000:20:00.0" and d["iobase"] is None
    assert d["console_arg"] == "0000:21:00.0" and d["log"] == "/runs/r1/console-pxb1.log"
    assert m.pci_serial.describe()["root_bus"] == "0000:00"
    # No NUMA node unless asked for (QEMU needs -numa for it).
    assert not any("numa_node" in dev for dev in devices)


def test_pxb_numa_nodes_spread_round_robin():
    _, cmd = _cmd(pxb_numa_nodes=(0, 1))
    pxbs = [d for d in _pairs(cmd, "-device") if d.startswith("pxb-pcie")]
    assert [d.rsplit(",", 1)[1] for d in pxbs] == ["numa_node=0", "numa_node=1", "numa_node=0"]


def test_x2apic_adds_interrupt_remapping_iommu_first():
    _, cmd = _cmd(x2apic=True)
    devices = _pairs(cmd, "-device")
    assert devices[0] == "intel-iommu,intremap=on,eim=on"
    # The IOMMU comes before every PCI device on the command line.
    assert cmd.index("intel-iommu,intremap=on,eim=on") < cmd.index(
        "pci-serial,chardev=slicecon3,bus=pcie.0,addr=0x10")


def test_host_append_xapic_and_x2apic():
    x = host_append("1G", x2apic=False)
    assert x.split()[:3] == ["console=ttyS0,115200", "maxcpus=1", "mem=1G"]
    assert "panic=-1" in x.split()
    assert "intremap=off" not in x and "intel_iommu" not in x
    x2 = host_append("2g", x2apic=True)
    assert "mem=2G" in x2.split()
    assert "intel_iommu=off" in x2.split()
    assert "intremap=off" not in x2


def test_cpu_model_and_no_slice_consoles():
    cfg = MachineConfig(kernel=Path("/k"), append="", cpu_model="max,-x2apic", slice_consoles=False)
    m = QemuMachine(cfg, Path("/w"))
    cmd = m.command()
    assert _pairs(cmd, "-cpu") == ["max,-x2apic"]
    assert "-initrd" not in cmd
    assert not any("serial" in d for d in _pairs(cmd, "-device"))


@pytest.mark.parametrize("bad", ["", "0", "6 G", "6GB", "-1G", "lots"])
def test_bad_sizes_rejected(bad):
    with pytest.raises(UsageError):
        qemu.check_size(bad, "--memory")


def test_size_bytes():
    assert qemu.size_bytes("1G") == 1 << 30
    assert qemu.size_bytes("512M") == 512 << 20
    assert qemu.size_bytes("2048") == 2048 << 20


def test_log_follower_returns_complete_lines(tmp_path):
    f = tmp_path / "log"
    fol = qemu.LogFollower(f)
    assert fol.poll() == []
    f.write_bytes(b"one\r\ntw")
    assert fol.poll() == ["one"]
    with open(f, "ab") as h:
        h.write(b"o\nthree")
    assert fol.poll() == ["two"]
    assert fol.lines == ["one", "two"]


def test_machine_teardown_kills_by_pid(tmp_path):
    """A 'QEMU' that ignores SIGTERM is SIGKILLed by its PID on __exit__."""
    script = tmp_path / "fake-qemu"
    ready = tmp_path / "ready"
    script.write_text(f"#!/bin/sh\ntrap '' TERM\ntouch {ready}\nwhile :; do sleep 1; done\n")
    script.chmod(0o755)
    cfg = MachineConfig(kernel=Path("/k"), append="", qemu_binary=str(script), slice_consoles=False)
    m = QemuMachine(cfg, tmp_path / "w")
    with m:
        m.launch()
        pid = m.pid
        assert pid in qemu.LIVE_PIDS
        assert (tmp_path / "w" / qemu.PID_FILE).read_text() == f"{pid}\n"
        assert m.is_running()
        deadline = time.monotonic() + 10
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        m.shutdown(grace=0.5)
    assert not m.is_running()
    assert pid not in qemu.LIVE_PIDS
    assert m.exit_code == -9
    assert (tmp_path / "w" / "qemu-command.txt").read_text().startswith(str(script))


def test_numa_machine_puts_pxb_root_buses_on_the_nodes():
    _, cmd = _cmd(numa=2, smp=4, memory="6G")
    pxbs = [d for d in _pairs(cmd, "-device") if d.startswith("pxb-pcie")]
    assert [d.rsplit(",", 1)[1] for d in pxbs] == ["numa_node=0", "numa_node=1", "numa_node=0"]


def test_sriov_devices():
    from coreslice.testbed import sriov as sriovdevs

    args = sriovdevs.device_args()
    devs = [args[i + 1] for i in range(0, len(args), 2)]
    assert all(args[i] == "-device" for i in range(0, len(args), 2))
    nvme = next(d for d in devs if d.startswith("nvme,"))
    # QEMU: max_ioqpairs - sriov_vq_flexible >= 2 (the PF's own queues)
    props = dict(p.split("=", 1) for p in nvme.split(",")[1:])
    assert int(props["max_ioqpairs"]) - int(props["sriov_vq_flexible"]) >= 2
    assert props["subsys"] == "srsubsys" and any(d.startswith("nvme-subsys,id=srsubsys") for d in devs)
    assert any(d.startswith("igb,") for d in devs)
    assert sriovdevs.MODULES.index("dca") < sriovdevs.MODULES.index("igb")
