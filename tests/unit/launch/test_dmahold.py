"""A slice's IOMMU domain (launch/dmahold.py, machine/vfio.py): the VFIO calls in order with
their layouts, group checks on a sysfs tree, binding undone when the domain cannot be built,
and the launch and stop ordering on the fake machine (domain before the INIT, released after
the functions went quiet)."""

from __future__ import annotations

import dataclasses
import errno
import os
import struct
from pathlib import Path

import pytest

from coreslice.errors import LaunchError, UsageError
from coreslice.launch import dmahold
from coreslice.launch import session as launch
from coreslice.launch.dmahold import FakeDma, Range
from coreslice.machine import vfio

from ..plan.test_boot import Fakes
from ..test_ledger import host, ledger, ledger_path, tree  # noqa: F401  (the same fixtures)
from .test_lifecycle import GIB, _order, spec  # noqa: F401

FN = "0000:41:00.0"


# -- the VFIO container -------------------------------------------------------------------------

class FakeIoctl:
    def __init__(self, viable=True, set_iommu_errno=None):
        self.calls: list[tuple[int, int, object]] = []
        self.viable, self.set_iommu_errno = viable, set_iommu_errno

    def __call__(self, fd, req, arg=0):
        self.calls.append((fd, req, bytes(arg) if isinstance(arg, (bytes, bytearray)) else arg))
        if req == vfio.VFIO_GET_API_VERSION:
            return 0
        if req == vfio.VFIO_CHECK_EXTENSION:
            return 1 if arg == vfio.VFIO_TYPE1v2_IOMMU else 0
        if req == vfio.VFIO_GROUP_GET_STATUS:
            struct.pack_into("<II", arg, 0, 8, vfio.GROUP_FLAGS_VIABLE if self.viable else 0)
            return 0
        if req == vfio.VFIO_SET_IOMMU and self.set_iommu_errno:
            raise OSError(self.set_iommu_errno, os.strerror(self.set_iommu_errno))
        if req == vfio.VFIO_GROUP_GET_DEVICE_FD:
            return os.open(os.devnull, os.O_RDONLY)
        return 0

    def names(self):
        rev = {v: k for k, v in vars(vfio).items() if k.startswith("VFIO_") and isinstance(v, int) and v > 0x3b00}
        return [rev[r] for _fd, r, _a in self.calls]


@pytest.fixture
def dev(tmp_path):
    d = tmp_path / "dev"
    (d / "vfio").mkdir(parents=True)
    for name in ("vfio/vfio", "vfio/7"):
        (d / name).write_bytes(b"")
    with open(d / "mem", "wb") as f:  # a file stands in for /dev/mem: offsets are physical addresses
        f.truncate(0x200000)
    return d


def test_the_container_calls_come_in_the_order_vfio_rst_gives_and_map_iova_equal_to_physical(dev):
    io = FakeIoctl()
    c = vfio.Container(dev=str(dev), ioctl=io)
    c.open()
    c.add_group(7)
    c.set_iommu()
    c.map_physical(0x100000, 0x100000, devmem=str(dev / "mem"))
    c.open_device(7, FN)
    assert io.names() == ["VFIO_GET_API_VERSION", "VFIO_CHECK_EXTENSION", "VFIO_GROUP_GET_STATUS",
                          "VFIO_GROUP_SET_CONTAINER", "VFIO_SET_IOMMU", "VFIO_IOMMU_MAP_DMA", "VFIO_GROUP_GET_DEVICE_FD"]
    argsz, flags, vaddr, iova, size = struct.unpack("<IIQQQ", io.calls[5][2])
    assert (argsz, flags, iova, size) == (32, 3, 0x100000, 0x100000) and vaddr
    assert io.calls[6][2] == FN.encode() + b"\0"
    assert struct.unpack("<i", io.calls[3][2])[0] == c.fd
    c.close()
    assert io.names()[-1] == "VFIO_IOMMU_UNMAP_DMA" and c.fd is None and not c.devices


def test_a_group_that_is_not_viable_or_an_iommu_refusal_is_a_clear_error(dev):
    c = vfio.Container(dev=str(dev), ioctl=FakeIoctl(viable=False))
    c.open()
    with pytest.raises(LaunchError, match="IOMMU group 7 is not viable: a function in it is still bound"):
        c.add_group(7)
    c.close()
    c = vfio.Container(dev=str(dev), ioctl=FakeIoctl(set_iommu_errno=errno.EPERM))
    c.open()
    c.add_group(7)
    with pytest.raises(LaunchError, match="allow_unsafe_interrupts=1"):
        c.set_iommu()
    c.close()


# -- groups and binding on a sysfs tree ------------------------------------------------------------

def sysfs(root: Path, fns: dict[str, tuple[int, str | None, str]]) -> Path:
    """fns: address -> (group, driver, class)."""
    for addr, (group, driver, cls) in fns.items():
        d = root / "sys/bus/pci/devices" / addr
        d.mkdir(parents=True)
        (d / "class").write_text(cls + "\n")
        (d / "driver_override").write_text("(null)\n")
        g = root / "sys/kernel/iommu_groups" / str(group) / "devices"
        g.mkdir(parents=True, exist_ok=True)
        (g / addr).symlink_to(d)
        (d / "iommu_group").symlink_to(root / "sys/kernel/iommu_groups" / str(group))
        if driver:
            drv = root / "sys/bus/pci/drivers" / driver
            drv.mkdir(parents=True, exist_ok=True)
            (d / "driver").symlink_to(drv)
    (root / "sys/bus/pci/drivers/vfio-pci").mkdir(parents=True, exist_ok=True)
    return root


def test_groups_are_refused_when_shared_with_a_function_the_host_drives(tmp_path):
    root = sysfs(tmp_path, {FN: (7, None, "0x010802"), "0000:41:00.1": (7, "igb", "0x020000"),
                            "0000:40:03.0": (7, "pcieport", "0x060400"), "0000:61:00.0": (9, None, "0x010802")})
    assert dmahold.host_translates(root)
    with pytest.raises(UsageError, match=r"0000:41:00.0 shares IOMMU group 7 with 0000:41:00.1 \(igb\)"):
        dmahold.groups_for([FN], root)
    assert dmahold.groups_for([FN, "0000:41:00.1"], root) == {FN: 7, "0000:41:00.1": 7}
    assert dmahold.groups_for(["0000:61:00.0"], root) == {"0000:61:00.0": 9}
    (root / "sys/bus/pci/devices/0000:61:00.0/iommu_group").unlink()
    with pytest.raises(UsageError, match="in no IOMMU group although the host's IOMMU translates"):
        dmahold.groups_for(["0000:61:00.0"], root)
    assert not dmahold.host_translates(tmp_path / "nothing")


def test_a_domain_that_cannot_be_built_leaves_the_functions_unbound_with_the_coreslice_override(tmp_path, dev):
    root = sysfs(tmp_path, {FN: (7, None, "0x010802")})
    (root / dmahold.UNSAFE_INTERRUPTS).parent.mkdir(parents=True)
    (root / dmahold.UNSAFE_INTERRUPTS).write_text("N\n")

    class Failing(vfio.Container):
        def set_iommu(self):
            raise LaunchError("VFIO_SET_IOMMU: Operation not permitted")
    c = Failing(dev=str(dev), ioctl=FakeIoctl())
    with pytest.raises(LaunchError, match="VFIO_SET_IOMMU"):
        dmahold.build_domain([FN], [Range(0x100000, 0x100000)], root, container=c)
    d = root / "sys/bus/pci/devices" / FN
    assert (d / "driver_override").read_text() == "coreslice"
    assert (root / dmahold.UNSAFE_INTERRUPTS).read_text() == "0"  # set for the build, put back after it failed
    assert (root / "sys/bus/pci/drivers/vfio-pci/bind").read_text() == FN  # it had been bound
    assert c.fd is None and not c.groups


def test_range_arguments_are_checked():
    assert Range.parse("0x40000000:0x20000000") == Range(0x40000000, 0x20000000)
    for bad in ("0x40000000", "x:y", "0x1001:0x1000", "0x1000:0"):
        with pytest.raises(UsageError):
            Range.parse(bad)


# -- the launch and stop on the fake machine --------------------------------------------------------

def test_with_the_iommu_on_the_domain_is_built_before_the_init_and_released_after_the_quiesce(spec, host, ledger):
    fakes = Fakes()
    fakes.m.dma = FakeDma(iommu=True)
    events = _order(fakes)
    dma = fakes.m.dma
    real_hold, real_release = dma.hold, dma.release
    dma.hold = lambda *a: (events.append("hold"), real_hold(*a))[1]
    dma.release = lambda n: (events.append("release"), real_release(n))[1]
    result = launch.boot(dataclasses.replace(spec, console="00:03.0"), host=host, machine=fakes.machine(), ledger=ledger)
    assert dma.log == ["hold web 0000:00:03.0 0x40000000:0x20000000"]
    assert events.index("hold") < min(i for i, e in enumerate(events) if e.startswith("ipi 101"))
    assert result.to_json()["dma"]["confined"] and result.dma["iova"] == {"base": 0x40000000, "size": GIB // 2}
    out = launch.stop("web", host=host, machine=fakes.machine(), ledger=ledger)
    assert events.index("quiesce 0000:00:03.0") < events.index("release")
    assert events.index("bus master off 0000:00:03.0") < events.index("release")
    assert out.to_json()["dma"] == "DMA domain released" and dma.held == {}


def test_without_the_iommu_nothing_is_held(spec, host, ledger):
    fakes = Fakes()
    result = launch.boot(dataclasses.replace(spec, console="00:03.0"), host=host, machine=fakes.machine(), ledger=ledger)
    assert result.dma is None and fakes.m.dma.log == []


def test_a_domain_that_fails_undoes_the_detach_and_releases_the_reservation(spec, host, ledger):
    fakes = Fakes()
    fakes.m.dma = FakeDma(iommu=True, fail="DMA domain for 'web': VFIO_SET_IOMMU: Operation not permitted")
    with pytest.raises(LaunchError, match="VFIO_SET_IOMMU: Operation not permitted; undid all 1 changes"):
        launch.boot(dataclasses.replace(spec, console="00:03.0"), host=host, machine=fakes.machine(), ledger=ledger)
    assert fakes.pci.attached == [("0000:00:03.0", None)]
    assert fakes.mem.writes == [] and all(a.sent == [] for a in fakes.apics) and ledger.holding() == []


def test_a_relaunch_lets_the_old_domain_go_before_detaching_and_builds_a_new_one(spec, host, ledger):
    fakes = Fakes()
    fakes.m.dma = FakeDma(iommu=True)
    console = dataclasses.replace(spec, console="00:03.0")
    launch.boot(console, host=host, machine=fakes.machine(), ledger=ledger)
    detached_before = len(fakes.pci.detached)
    result = launch.boot(console, host=host, machine=fakes.machine(), ledger=ledger)
    assert fakes.m.dma.log == ["hold web 0000:00:03.0 0x40000000:0x20000000", "release web",
                               "hold web 0000:00:03.0 0x40000000:0x20000000"]
    assert result.dma_released == ["web: DMA domain released"] and len(fakes.pci.detached) == detached_before + 1


def _fake_holder(name: str):
    """A process whose command line is a dma-hold's (what holder_alive checks, against pid reuse)."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "dma-hold", "--name", name])


def test_status_says_when_a_slices_dma_holder_is_gone(tmp_path, monkeypatch):
    from coreslice.cli.console import dma_status

    monkeypatch.setenv(dmahold.RUN_DIR_ENV, str(tmp_path))
    assert dma_status("web") is None
    holder = _fake_holder("web")
    try:
        time_left = 50
        while time_left and b"dma-hold" not in Path(f"/proc/{holder.pid}/cmdline").read_bytes():
            import time
            time.sleep(0.1)
            time_left -= 1
        dmahold._write_state(dmahold.state_path("web"), {"name": "web", "ready": True, "pid": holder.pid, "functions": [FN]})
        assert dma_status("web") == {"confined": True, "holder_pid": holder.pid, "functions": [FN], "problem": None}
        # a live pid that is not that slice's holder (a reused pid) counts as gone
        dmahold._write_state(dmahold.state_path("web"), {"name": "web", "ready": True, "pid": os.getpid(), "functions": [FN]})
        assert "DMA holder is gone" in dma_status("web")["problem"]
    finally:
        holder.kill()
        holder.wait()
    dmahold._write_state(dmahold.state_path("web"), {"name": "web", "ready": True, "pid": 2 ** 22 + 1, "functions": []})
    assert "DMA holder is gone" in dma_status("web")["problem"]
    assert dmahold.release("web") == "DMA holder already gone (its domain with it)"
    assert not dmahold.state_path("web").exists()


def test_release_ends_the_holder_and_leaves_no_state_or_log(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv(dmahold.RUN_DIR_ENV, str(tmp_path))
    holder = _fake_holder("web")
    while b"dma-hold" not in Path(f"/proc/{holder.pid}/cmdline").read_bytes():
        time.sleep(0.05)
    dmahold._write_state(dmahold.state_path("web"), {"name": "web", "ready": True, "pid": holder.pid, "functions": []})
    dmahold.state_path("web").with_suffix(".log").write_text("holder output\n")
    assert dmahold.release("web") == f"DMA domain released (holder pid {holder.pid})"
    holder.wait(timeout=5)  # (release reaped it already: its own child here)
    assert list((tmp_path / "dma").iterdir()) == []


def test_a_passthrough_default_domain_is_refused(tmp_path):
    root = sysfs(tmp_path, {FN: (7, None, "0x010802")})
    (root / "sys/kernel/iommu_groups/7/type").write_text("DMA-FQ\n")
    assert dmahold.groups_for([FN], root) == {FN: 7}
    (root / "sys/kernel/iommu_groups/7/type").write_text("identity\n")
    with pytest.raises(UsageError, match="default domain of type identity"):
        dmahold.groups_for([FN], root)


def test_a_holder_that_fails_to_start_is_ended_and_its_functions_unbound(tmp_path, monkeypatch):
    """The launcher's side with a real child process: it writes an error state and exits; the
    launcher raises with its reason and leaves no state behind."""
    monkeypatch.setenv(dmahold.RUN_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(dmahold, "_command", lambda name, f, r: [
        __import__("sys").executable, "-c",
        "import json,os,sys; p=sys.argv[1]; open(p,'w').write(json.dumps({'ready': False, 'error': 'no vfio here'}))",
        str(dmahold.state_path(name))])
    unbound = []
    monkeypatch.setattr(dmahold, "unbind_all", lambda fns, root=Path("/"): unbound.extend(fns) or [])
    monkeypatch.setattr(dmahold.Path, "is_dir", lambda self: False if str(self) == "/run/systemd/system" else os.path.isdir(self))
    with pytest.raises(LaunchError, match="DMA domain for 'web': no vfio here"):
        dmahold.start("web", [FN], [Range(0x40000000, 0x1000)], timeout=30)
    assert unbound == [FN] and not dmahold.state_path("web").exists()


def test_under_systemd_the_holder_runs_as_a_transient_unit(tmp_path, monkeypatch):
    """systemd-run gets the unit name, --collect, the environment the holder needs and the
    dma-hold command line; a fake systemd-run runs it (it writes a ready state) and records."""
    monkeypatch.setenv(dmahold.RUN_DIR_ENV, str(tmp_path / "run"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "systemctl $*" >> {calls}\necho active\n')
    # The fake unit: record the arguments, then write what a holder that built its domain writes.
    (bin_dir / "systemd-run").write_text(
        f'#!/bin/sh\necho "systemd-run $*" >> {calls}\n'
        f'mkdir -p {tmp_path}/run/dma && echo \'{{"ready": true, "pid": 1, "name": "web"}}\' > {tmp_path}/run/dma/web.json\n')
    for f in ("systemctl", "systemd-run"):
        (bin_dir / f).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(dmahold.Path, "is_dir", lambda self: True if str(self) == "/run/systemd/system" else os.path.isdir(self))
    state = dmahold.start("web", [FN], [Range(0x40000000, 0x20000000)], timeout=30)
    assert state["ready"]
    lines = calls.read_text().splitlines()
    assert lines[0] == "systemctl reset-failed coreslice-dma-web.service"
    run = lines[1].split()
    assert run[:4] == ["systemd-run", "--quiet", "--unit=coreslice-dma-web.service", "--collect"]
    assert f"--setenv={dmahold.RUN_DIR_ENV}={tmp_path / 'run'}" in run and any(a.startswith("--setenv=PYTHONPATH=") for a in run)
    cmd = run[run.index("--") + 1:]
    assert cmd[1:] == ["-m", "coreslice", "dma-hold", "--name", "web", "--function", FN, "--range", "0x40000000:0x20000000"]
