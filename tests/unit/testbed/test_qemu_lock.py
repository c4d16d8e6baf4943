"""One emulated machine at a time: the flock that QemuMachine.launch holds for QEMU's life."""

import fcntl
import os
import time
from pathlib import Path

import pytest

from coreslice.testbed import qemu
from coreslice.testbed.qemu import MachineConfig, MachineLock, QemuMachine
from coreslice.testbed.tools import ToolError


def _is_locked(path: Path) -> bool:
    """True when someone else holds an exclusive flock on ``path`` (a fresh open file description)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _fake_qemu(tmp_path: Path, name: str = "qemu-system-x86_64") -> Path:
    """A stand-in QEMU under a real QEMU's name (so it takes the lock) that runs until killed."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / name
    # exec: no child process shares the inherited lock descriptor past the fake's own death
    script.write_text("#!/bin/sh\nexec sleep 3600\n")
    script.chmod(0o755)
    return script


def _machine(binary: Path, workdir: Path) -> QemuMachine:
    cfg = MachineConfig(kernel=Path("/k"), append="", qemu_binary=str(binary), slice_consoles=False)
    return QemuMachine(cfg, workdir)


@pytest.fixture
def lockfile(tmp_path, monkeypatch):
    path = tmp_path / "locks" / "qemu.lock"
    monkeypatch.setenv(qemu.LOCK_ENV, str(path))
    monkeypatch.delenv(qemu.LOCK_WAIT_ENV, raising=False)
    return path


def test_lock_path_default_is_under_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(qemu.LOCK_ENV, raising=False)
    monkeypatch.setenv("CORESLICE_CACHE", str(tmp_path / "cache"))
    assert qemu.machine_lock_path() == (tmp_path / "cache").resolve() / "qemu.lock"
    monkeypatch.setenv(qemu.LOCK_ENV, str(tmp_path / "elsewhere.lock"))
    assert qemu.machine_lock_path() == tmp_path / "elsewhere.lock"
    for off in ("off", "OFF", "none", "0"):
        monkeypatch.setenv(qemu.LOCK_ENV, off)
        assert qemu.machine_lock_path() is None


def test_lock_wait_setting(monkeypatch):
    monkeypatch.delenv(qemu.LOCK_WAIT_ENV, raising=False)
    assert qemu._lock_wait_seconds() == qemu.DEFAULT_LOCK_WAIT
    monkeypatch.setenv(qemu.LOCK_WAIT_ENV, "2.5")
    assert qemu._lock_wait_seconds() == 2.5
    monkeypatch.setenv(qemu.LOCK_WAIT_ENV, "soon")
    with pytest.raises(ToolError, match=qemu.LOCK_WAIT_ENV):
        qemu._lock_wait_seconds()


def test_machine_lock_excludes_and_names_its_holder(lockfile):
    first = MachineLock(lockfile)
    first.acquire(0, "pid 1 run dir /runs/a")
    assert first.held and _is_locked(lockfile)
    assert first.holder() == "pid 1 run dir /runs/a"
    second = MachineLock(lockfile)
    t0 = time.monotonic()
    with pytest.raises(ToolError) as err:
        second.acquire(0.3, "pid 2 run dir /runs/b")
    assert time.monotonic() - t0 >= 0.3
    msg = str(err.value)
    assert "pid 1 run dir /runs/a" in msg and str(lockfile) in msg and "CORESLICE_QEMU_LOCK=off" in msg
    assert not second.held
    first.release()
    assert not _is_locked(lockfile)
    second.acquire(0, "pid 2 run dir /runs/b")
    assert second.holder() == "pid 2 run dir /runs/b"
    second.release()


def test_waiting_launch_gets_the_lock_when_the_holder_ends(lockfile):
    holder = MachineLock(lockfile)
    holder.acquire(0, "pid 1 run dir /runs/a")
    import threading

    threading.Timer(0.4, holder.release).start()
    waiter = MachineLock(lockfile)
    t0 = time.monotonic()
    waiter.acquire(10, "pid 2 run dir /runs/b")
    assert 0.3 <= time.monotonic() - t0 < 5
    waiter.release()


def test_qemu_holds_the_lock_for_its_life(tmp_path, lockfile):
    m = _machine(_fake_qemu(tmp_path), tmp_path / "w1")
    with m:
        m.launch()
        assert _is_locked(lockfile)
        assert lockfile.read_text().strip() == f"pid {os.getpid()} run dir {tmp_path / 'w1'}"
        # The launching process lets go of its copy (as if it died): QEMU, which inherited the
        # descriptor, still holds the lock.
        m._lock.release()
        assert _is_locked(lockfile)
        m.shutdown(grace=0.5)
    assert not m.is_running()
    assert not _is_locked(lockfile)


def test_second_machine_waits_then_fails_clearly_without_starting(tmp_path, lockfile, monkeypatch):
    binary = _fake_qemu(tmp_path)
    first = _machine(binary, tmp_path / "w1")
    with first:
        first.launch()
        monkeypatch.setenv(qemu.LOCK_WAIT_ENV, "0.5")
        second = _machine(binary, tmp_path / "w2")
        live = set(qemu.LIVE_PIDS)
        with pytest.raises(ToolError) as err:
            second.launch()
        assert f"run dir {tmp_path / 'w1'}" in str(err.value)
        assert second.pid is None and qemu.LIVE_PIDS == live
        assert not (tmp_path / "w2" / qemu.PID_FILE).exists()
    # The first machine is gone, so the second one starts now.
    second = _machine(binary, tmp_path / "w2")
    with second:
        second.launch()
        assert second.is_running() and _is_locked(lockfile)
    assert not _is_locked(lockfile)


def test_lock_released_when_qemu_exits_by_itself(tmp_path, lockfile):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "qemu-system-x86_64"
    script.write_text("#!/bin/sh\nexit 3\n")
    script.chmod(0o755)
    m = _machine(script, tmp_path / "w")
    with m:
        m.launch()
        assert m.wait(timeout=10) == 3
        assert not _is_locked(lockfile)


def test_lock_off_and_stand_in_binaries_take_no_lock(tmp_path, lockfile, monkeypatch):
    # A stand-in whose name is not qemu-system-* (unit tests' fake QEMUs) takes no lock.
    m = _machine(_fake_qemu(tmp_path, name="fake-qemu"), tmp_path / "w1")
    with m:
        m.launch()
        assert not lockfile.exists() or not _is_locked(lockfile)
    # CORESLICE_QEMU_LOCK=off lets two real machines run side by side on purpose.
    monkeypatch.setenv(qemu.LOCK_ENV, "off")
    binary = _fake_qemu(tmp_path)
    a, b = _machine(binary, tmp_path / "a"), _machine(binary, tmp_path / "b")
    with a, b:
        a.launch()
        b.launch()
        assert a.is_running() and b.is_running()
