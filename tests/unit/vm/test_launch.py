"""vm/launch.py: run_vm's sequence against fakes, and everything given back however the VM ends."""

from __future__ import annotations

import signal

import pytest

from coreslice.errors import LaunchError
from coreslice.vm import hugepages as hp
from coreslice.vm.launch import run_vm
from coreslice.vm.plan import Hugepages, VmPlan

from .test_hugepages import hugetree

NIC, VF = "0000:21:00.0", "0000:21:10.0"
GROUPS = {NIC: 7, VF: 9}
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@pytest.fixture(autouse=True)
def handlers_restored():
    before = {s: signal.getsignal(s) for s in SIGNALS}
    yield
    after = {s: signal.getsignal(s) for s in SIGNALS}
    for s, h in before.items():
        signal.signal(s, h)
    assert after == before


@pytest.fixture
def events(tmp_path, monkeypatch):
    """Every effect in order; huge page pool writes are recorded as ("nr_hugepages", value)."""
    ev, real = [], hp._write

    def write(path, value):
        ev.append(("nr_hugepages", value))
        real(path, value)
    monkeypatch.setattr(hp, "_write", write)
    return ev


def vm_plan(tmp_path, hugepages=True):
    return VmPlan(argv=["qemu-system-x86_64", "-S"], pinning={0: 2, 1: 3},
                  hugepages=Hugepages("2M", 8, 0) if hugepages else None, numa_node=0,
                  serial_log=tmp_path / "log/serial.log", qmp_socket=tmp_path / "run/qmp.sock")


class FakeVfio:
    def __init__(self, events, fail=()):
        self.events, self.fail = events, fail

    def bind(self, addr, group):
        self.events.append(("bind", addr))
        if addr in self.fail:
            raise LaunchError(f"{addr} did not bind to vfio-pci")
        return "igb"

    def unbind(self, addr, old):
        self.events.append(("unbind", addr, old))
        return old


class FakeQemu:
    """Stands in for subprocess.Popen: call it as popen(argv, ...)."""

    pid = 4242

    def __init__(self, events, plan, exit_code=0, socket=True, output=b"", on_wait=None):
        self.events, self.plan, self.exit_code, self.socket = events, plan, exit_code, socket
        self.output, self.on_wait, self.returncode = output, on_wait, None

    def __call__(self, argv, **kw):
        self.events.append(("popen", argv))
        kw["stdout"].write(self.output)
        if self.socket:
            self.plan.qmp_socket.touch()
        else:
            self.returncode = self.exit_code  # died at once
        return self

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            if self.on_wait:
                self.on_wait()
            self.events.append(("exit", self.exit_code))
            self.returncode = self.exit_code
        return self.returncode

    def terminate(self):
        self.events.append(("terminate",))
        self.returncode = -15

    def kill(self):
        self.returncode = -9


def pinner(events, fail=False):
    def pin(socket, pinning):
        events.append(("pin", socket.exists()))
        if fail:
            raise LaunchError("QMP on the socket did not answer")
        return {v: {"cpu": c, "thread": 500 + v} for v, c in pinning.items()}
    return pin


def launch(tmp_path, plan, events, qemu=None, vfio=None, pin=None, groups=GROUPS):
    return run_vm(plan, "web1", devices_groups=groups, root=tmp_path, run_dir=tmp_path / "run",
                  popen=qemu or FakeQemu(events, plan), pin=pin or pinner(events),
                  vfio=vfio or FakeVfio(events))


def test_guest_exit_gives_everything_back_in_reverse(tmp_path, events):
    nr = hugetree(tmp_path, nr=10, free=3)
    plan = vm_plan(tmp_path)
    run = launch(tmp_path, plan, events)
    assert events == [("nr_hugepages", 15), ("bind", NIC), ("bind", VF), ("popen", plan.argv), ("pin", True),
                      ("exit", 0), ("unbind", VF, "igb"), ("unbind", NIC, "igb"), ("nr_hugepages", 10)]
    assert nr.read_text() == "10\n"
    assert not plan.qmp_socket.exists() and not (tmp_path / "run/qemu.pid").exists()
    j = run.to_json()
    assert (j["exit_code"], j["ended_by"], j["pid"]) == (0, "guest", 4242)
    assert j["pinning"] == {"0": {"cpu": 2, "thread": 500}, "1": {"cpu": 3, "thread": 501}}
    assert j["devices"][NIC] == {"iommu_group": 7, "host_driver": "igb", "returned_to": "igb"}
    assert j["hugepages"] == {"size": "2M", "count": 8, "node": 0, "pool": str(nr), "before": 10, "added": 5}


def test_signal_while_the_guest_runs_stops_qemu(tmp_path, events):
    plan = vm_plan(tmp_path, hugepages=False)
    deliver = lambda: signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # noqa: E731
    run = launch(tmp_path, plan, events, qemu=FakeQemu(events, plan, on_wait=deliver), groups={NIC: 7})
    assert events[-2:] == [("terminate",), ("unbind", NIC, "igb")]
    assert (run.ended_by, run.exit_code) == ("signal SIGTERM", -15)


def test_pin_failure_stops_qemu_and_gives_back(tmp_path, events):
    nr = hugetree(tmp_path, nr=10, free=3)
    plan = vm_plan(tmp_path)
    with pytest.raises(LaunchError, match="did not answer"):
        launch(tmp_path, plan, events, pin=pinner(events, fail=True))
    assert events[4:] == [("pin", True), ("terminate",), ("unbind", VF, "igb"), ("unbind", NIC, "igb"),
                          ("nr_hugepages", 10)]
    assert nr.read_text() == "10\n" and not plan.qmp_socket.exists()


def test_qemu_exiting_before_its_socket(tmp_path, events):
    plan = vm_plan(tmp_path, hugepages=False)
    qemu = FakeQemu(events, plan, exit_code=1, socket=False,
                    output=b"starting\nqemu-system-x86_64: vfio 0000:21:00.0: group 7 is not viable\n")
    with pytest.raises(LaunchError, match="QEMU exited with 1 before opening QMP: starting \\| .*group 7 is not viable"):
        launch(tmp_path, plan, events, qemu=qemu, groups={NIC: 7})
    assert [e[0] for e in events] == ["bind", "popen", "unbind"]


def test_second_bind_failing_unbinds_the_first_and_releases_pages(tmp_path, events):
    nr = hugetree(tmp_path, nr=10, free=3)
    plan = vm_plan(tmp_path)
    with pytest.raises(LaunchError, match=f"{VF} did not bind"):
        launch(tmp_path, plan, events, vfio=FakeVfio(events, fail={VF}))
    assert events == [("nr_hugepages", 15), ("bind", NIC), ("bind", VF), ("unbind", NIC, "igb"),
                      ("nr_hugepages", 10)]
    assert nr.read_text() == "10\n"
