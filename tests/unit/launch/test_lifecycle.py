"""A slice's life on the fake machine: the wake handshake, scrubbing, stop (devices first),
restart with the recorded request, and `kill -9` of a launch at each phase with real processes."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coreslice import cli
from coreslice.boot import lowmem
from coreslice.errors import LaunchError
from coreslice.host.snapshot import discover
from coreslice.launch import session as launch
from coreslice.ledger import ENV, PHASES, Ledger
from coreslice.machine import lapic
from coreslice.request import BootSpec

from ..hosttree import BOOT_ID
from ..plan.test_boot import Fakes
from ..test_ledger import host, ledger, ledger_path, tree  # noqa: F401  (the same fixtures)

GIB = 1 << 30
SRC = str(Path(__file__).resolve().parents[3] / "src")
MARKER = b"coreslice-scrub-marker-0123456789"


@pytest.fixture
def spec(debian_kernel, tmp_path):
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"\x07" * 100_000)
    return BootSpec(kernel=debian_kernel.vmlinuz, initrd=initrd, cpus=[1, 2], mem_size=GIB // 2,
                    mem_base=0x40000000, console="io:0x2f8", name="web")


# -- the wake handshake ----------------------------------------------------------------------------

def test_boot_waits_for_the_handshake_and_reports_its_latency(spec, host, ledger):
    fakes = Fakes()
    result = launch.boot(spec, host=host, machine=fakes.machine(), ledger=ledger)
    assert set(result.wake) == {"entered_s", "kernel_s"} and 0 <= result.wake["entered_s"] <= result.wake["kernel_s"]
    assert result.to_json()["wake"]["kernel_s"] >= 0
    assert ledger.holding()[0].phase == "woken"


@pytest.mark.parametrize("broken, match", [
    ("dead_cpus", "did not wake within 0.05 s of its SIPI: the trampoline at 0x"),
    ("stuck_cpus", "woke but did not reach the kernel entry within 0.05 s"),
])
def test_a_cpu_that_never_arrives_fails_the_boot(spec, host, ledger, broken, match):
    fakes = Fakes()
    getattr(fakes.m, broken).add(1)  # APIC ID of CPU 1 in the host tree
    with pytest.raises(LaunchError, match=match) as exc:
        launch.boot(dataclasses.replace(spec, wake_timeout=0.05), host=host, machine=fakes.machine(), ledger=ledger)
    assert exc.value.exit_code == 1 and "\n" not in str(exc.value)
    (row,) = ledger.holding()  # its CPU may run: held as failed until stop or restart
    assert row.state == "failed" and row.phase == "waking" and match.split(":")[0][:20] in row.error


def test_trampoline_handshake_words_are_cleared_by_each_write(spec, host, ledger):
    """A new image resets the words: a wake that fails after a good one is not read as good."""
    fakes = Fakes()
    launch.boot(spec, host=host, machine=fakes.machine(), ledger=ledger)
    fakes.m.dead_cpus.add(1)
    with pytest.raises(LaunchError, match="did not wake"):
        launch.boot(dataclasses.replace(spec, wake_timeout=0.05), host=host, machine=fakes.machine(), ledger=ledger)


# -- scrub and stop --------------------------------------------------------------------------------

def _order(fakes: Fakes) -> list[str]:
    """Record quiesce, INIT and memory zeroing in one sequence."""
    events: list[str] = []
    pci, mem = fakes.pci, fakes.mem
    real_q, real_again, real_zero = pci.quiesce, pci.bus_master_off, mem.zero

    def quiesce(addr):
        events.append(f"quiesce {addr}")
        return real_q(addr)

    def again(addr):
        events.append(f"bus master off {addr}")
        return real_again(addr)

    def zero(addr, size, progress=None):
        events.append(f"zero 0x{addr:x}+0x{size:x}")
        return real_zero(addr, size, progress)

    pci.quiesce, pci.bus_master_off, mem.zero = quiesce, again, zero
    real_apic = fakes.m.apic

    def apic(mode):
        a = real_apic(mode)
        send = a.send_icr
        a.send_icr = lambda dest, cmd: (events.append(f"ipi {cmd >> 8 & 7:03b} {dest}"), send(dest, cmd))[1]
        return a

    fakes.m.apic = apic
    return events


def test_launch_scrubs_the_range_after_the_init_and_before_writing(spec, host, ledger):
    fakes = Fakes(preset={0x40000000 + 0x1234567: MARKER})  # left by "an earlier slice"
    events = _order(fakes)
    result = launch.boot(spec, host=host, machine=fakes.machine(), ledger=ledger)
    inits = [i for i, e in enumerate(events) if e.startswith("ipi 101")]
    zeros = [i for i, e in enumerate(events) if e.startswith("zero")]
    assert events[zeros[0]] == f"zero 0x40000000+0x{GIB // 2:x}"
    assert events[zeros[1]] == f"zero 0x{result.plan.slot:x}+0x{lowmem.SLOT_SIZE:x}"
    assert max(inits) < zeros[0]
    assert fakes.mem.read(0x40000000 + 0x1234567, len(MARKER)) == bytes(len(MARKER))
    assert result.phases["scrub"] >= 0
    # the image was written after the scrub: the trampoline is there
    assert fakes.mem.read(result.plan.slot, 1) == b"\xfa"


def test_stop_quiets_devices_then_parks_cpus_then_scrubs(spec, host, ledger):
    fakes = Fakes()
    launch.boot(dataclasses.replace(spec, console="00:03.0"), host=host, machine=fakes.machine(), ledger=ledger)
    fakes.mem.write(0x40000000 + 0x777000, MARKER)  # what the slice held
    events = _order(fakes)
    out = launch.stop("web", host=host, machine=fakes.machine(), ledger=ledger)
    assert events[0] == "quiesce 0000:00:03.0"
    assert [e for e in events if e.startswith("ipi")] == ["ipi 101 1", "ipi 101 2", "ipi 101 1", "ipi 101 2"]
    # Bus master cleared once more after the last INIT (the slice's kernel could set it again until
    # then), and before the scrub.
    last_init = max(i for i, e in enumerate(events) if e.startswith("ipi 101"))
    assert last_init < events.index("bus master off 0000:00:03.0") < events.index(f"zero 0x40000000+0x{GIB // 2:x}")
    assert fakes.mem.read(0x40000000 + 0x777000, len(MARKER)) == bytes(len(MARKER))
    assert out.scrubbed_bytes == GIB // 2 + lowmem.SLOT_SIZE and out.slice.state == "stopped"
    assert out.devices == {"0000:00:03.0": ["bus master off", "reset (flr)"]} and fakes.pci.reprobed == []


def test_a_relaunch_quiets_the_old_slices_functions_before_the_init_and_again_after(spec, host, ledger):
    """`coreslice boot` onto the resources of a slice that still holds them (it crashed, or was
    never stopped) replaces it: that slice's functions go quiet as on stop, before the INIT, and
    bus master off again after it, before the scrub."""
    fakes = Fakes()
    console = dataclasses.replace(spec, console="00:03.0")
    launch.boot(console, host=host, machine=fakes.machine(), ledger=ledger)
    events = _order(fakes)
    result = launch.boot(console, host=host, machine=fakes.machine(), ledger=ledger)
    assert result.slice.replaces and result.relaunch_quieted == {"0000:00:03.0": ["bus master off", "reset (flr)"]}
    first_init = min(i for i, e in enumerate(events) if e.startswith("ipi 101"))
    last_init = max(i for i, e in enumerate(events) if e.startswith("ipi 101"))
    assert events.index("quiesce 0000:00:03.0") < first_init
    assert last_init < events.index("bus master off 0000:00:03.0") < events.index(f"zero 0x40000000+0x{GIB // 2:x}")
    assert result.to_json()["relaunch_quieted"] == result.relaunch_quieted


def test_stop_no_scrub_leaves_memory_but_clears_the_slot_record(spec, host, ledger):
    fakes = Fakes()
    result = launch.boot(spec, host=host, machine=fakes.machine(), ledger=ledger)
    fakes.mem.write(0x40000000 + 0x777000, MARKER)
    out = launch.stop("web", host=host, machine=fakes.machine(), ledger=ledger, scrub=False, return_devices=True)
    assert fakes.mem.read(0x40000000 + 0x777000, len(MARKER)) == MARKER
    assert launch.read_slot_records(host, fakes.mem) == {} and out.scrubbed_bytes == 0
    assert result.plan.slot not in launch.read_slot_records(host, fakes.mem)


def test_stop_gives_devices_back_but_leaves_alone_one_the_host_driver_has(spec, host, ledger, tree):
    fakes = Fakes()
    launch.boot(dataclasses.replace(spec, console="00:03.0"), host=host, machine=fakes.machine(), ledger=ledger)
    out = launch.stop("web", host=host, machine=fakes.machine(), ledger=ledger, return_devices=True)
    assert list(out.devices) == ["0000:00:03.0"] and fakes.pci.reprobed == ["0000:00:03.0"]
    # As a launcher killed while detaching may leave it: the host's serial driver has it again.
    fakes = Fakes()
    launch.boot(dataclasses.replace(spec, console="00:03.0"), host=host, machine=fakes.machine(), ledger=ledger)
    (tree / "sys/bus/pci/drivers/serial").mkdir(parents=True, exist_ok=True)
    (tree / "sys/bus/pci/devices/0000:00:03.0/driver").symlink_to(tree / "sys/bus/pci/drivers/serial")
    out = launch.stop("web", host=host, machine=fakes.machine(), ledger=ledger)
    assert out.devices == {} and fakes.pci.quiesced == []
    assert "0000:00:03.0 is bound to the host driver serial: not the slice's, left alone" in out.warnings


# -- restart through the CLI -----------------------------------------------------------------------

def _cli(argv, tree, ledger_path, capsys):
    rc = cli.main([*argv, "--host-root", str(tree), "--ledger", str(ledger_path), "--json"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out.strip() else None), err


def test_restart_boots_the_recorded_request_on_the_same_resources(tree, ledger_path, debian_kernel, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.setenv("CORESLICE_FAKE_MACHINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "initrd.img").write_bytes(b"\x07" * 1000)
    rc, doc, err = _cli(["boot", "--kernel", str(debian_kernel.vmlinuz), "--initrd", "initrd.img", "--ncpus", "2",
                         "--memory", "512M", "--console", "io:0x2f8", "--name", "db", "--cmdline", "quiet x=1",
                         "--on-crash", "restart"], tree, ledger_path, capsys)
    assert rc == 0, err
    first = doc["slice"]
    assert first["request"] == [f"--kernel={debian_kernel.vmlinuz}", f"--initrd={tmp_path / 'initrd.img'}",
                                "--cmdline=quiet x=1", "--console=io:0x2f8", "--on-crash=restart",
                                f"--tsc-khz={doc['plan']['tsc_khz']}"]
    assert first["on_crash"] == "restart" and doc["wake"]["kernel_s"] >= 0
    monkeypatch.chdir("/")  # restart from elsewhere: the recorded paths are absolute
    rc, doc, err = _cli(["restart", "db"], tree, ledger_path, capsys)
    assert rc == 0, err
    again = doc["slice"]
    assert (again["cpus"], again["memory"]) == (first["cpus"], first["memory"])
    assert sorted(again["request"]) == sorted(first["request"])  # the same arguments (the TSC one now given)
    rows = Ledger(ledger_path, BOOT_ID).slices(history=True)
    assert [(r.name, r.state) for r in rows] == [("db", "stopped"), ("db", "running")]
    # a stopped slice restarts too
    assert _cli(["stop", "db"], tree, ledger_path, capsys)[0] == 0
    rc, doc, err = _cli(["restart", "db"], tree, ledger_path, capsys)
    assert rc == 0 and doc["slice"]["cpus"] == first["cpus"], err
    rc, doc, err = _cli(["restart", "nosuch"], tree, ledger_path, capsys)
    assert rc == 2 and "no slice named 'nosuch'" in err


# -- kill -9 at each phase, real processes ---------------------------------------------------------

@pytest.mark.parametrize("phase", [p for p in PHASES])
def test_kill9_at_each_phase_leaves_a_state_list_explains_and_stop_or_restart_recovers(
        phase, tree, ledger_path, debian_kernel, tmp_path, capsys, monkeypatch):
    pause = tmp_path / "paused"
    env = {**os.environ, "PYTHONPATH": SRC, "CORESLICE_FAKE_MACHINE": "1", ENV: str(ledger_path),
           launch.PAUSE_ENV: phase, launch.PAUSE_FILE_ENV: str(pause)}
    argv = [sys.executable, "-m", "coreslice", "boot", "--kernel", str(debian_kernel.vmlinuz), "--cpus", "1-2",
            "--memory", "512M@0x40000000", "--console", "00:03.0", "--name", "k9", "--host-root", str(tree)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not pause.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert pause.exists(), proc.stderr.read() if proc.poll() is not None else "never paused"
        assert pause.read_text().split() == [str(proc.pid), phase]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    monkeypatch.setenv("CORESLICE_FAKE_MACHINE", "1")
    rc, doc, err = _cli(["list", "--all"], tree, ledger_path, capsys)
    assert rc == 0, err
    (row,) = doc["slices"]
    assert row["phase"] == phase
    if phase == "woken":  # the slice was up; only the final ledger update was lost
        assert row["state"] == "launching" and "died after its CPU reached the kernel" in row["note"]
    elif phase == "reserved":
        assert row["state"] == "reserved" and "before changing anything" in row["note"]
        assert doc["free"][0]["cpus"] == [1, 2]  # it holds nothing: the CPUs are free at once
        rc, _, err = _cli(["stop", "k9"], tree, ledger_path, capsys)
        assert rc == 2 and "no slice named 'k9'" in err
        rc, doc, err = _cli(["boot", "--kernel", str(debian_kernel.vmlinuz), "--cpus", "1-2", "--memory",
                             "512M@0x40000000", "--console", "00:03.0", "--name", "k9"], tree, ledger_path, capsys)
        assert rc == 0, err
        return
    elif phase == "devices":
        assert row["state"] == "reserved" and "--return-devices" in row["note"]
    else:
        assert row["state"] == "launching" and f"died while {phase}" in row["note"]
    assert 1 not in doc["free"][0]["cpus"]  # still held: its CPUs may run
    # a new boot onto other resources is not blocked by it; one onto its CPUs is refused
    rc, _, err = _cli(["boot", "--kernel", str(debian_kernel.vmlinuz), "--cpus", "1", "--memory", "512M@0x80000000",
                       "--console", "io:0x2f8", "--name", "other"], tree, ledger_path, capsys)
    assert rc == 2 and "held by slice 'k9'" in err
    if phase in ("devices", "writing"):
        rc, doc, err = _cli(["stop", "k9", "--return-devices"], tree, ledger_path, capsys)
        assert rc == 0, err
        assert doc["slice"]["state"] == "stopped"
        rc, doc, err = _cli(["restart", "k9"], tree, ledger_path, capsys)
    else:
        rc, doc, err = _cli(["restart", "k9"], tree, ledger_path, capsys)
    assert rc == 0, err
    assert doc["slice"]["state"] == "running" and doc["slice"]["cpus"] == [1, 2]
    states = [(r.name, r.state) for r in Ledger(ledger_path, BOOT_ID).slices(history=True)]
    assert states[-1] == ("k9", "running") and [s for _, s in states].count("running") == 1


def test_stop_goes_on_when_a_function_cannot_be_quieted(spec, host, ledger):
    """A removed VF or a failed reset must not leave a slice that can never be stopped."""
    fakes = Fakes()
    launch.boot(dataclasses.replace(spec, console="00:03.0"), host=host, machine=fakes.machine(), ledger=ledger)

    def gone(addr):
        raise LaunchError(f"{addr} is gone from the host (no config); nothing to quiet there")

    fakes.pci.quiesce = gone
    out = launch.stop("web", host=host, machine=fakes.machine(), ledger=ledger)
    assert out.slice.state == "stopped" and out.devices == {} and "is gone from the host" in out.warnings[0]
    assert {a for a, c in fakes.apics[-1].sent if c >> 8 & 7 == 0b101} == {1, 2}


def test_a_failed_restart_does_not_scrub_memory_someone_else_took(spec, host, ledger, tree, capsys):
    from coreslice.cli.slices import _scrub_if_unheld
    from coreslice.ledger import SliceRecord

    fakes = Fakes()
    launch.boot(spec, host=host, machine=fakes.machine(), ledger=ledger)
    old = launch.stop("web", host=host, machine=fakes.machine(), ledger=ledger).slice
    # A concurrent launch takes the freed range (other CPUs) before the restart's boot.
    ledger.reserve(SliceRecord(name="other", cpus=(3,), apic_ids=(3,), mem_base=spec.mem_base, mem_size=spec.mem_size))
    fakes.mem.write(spec.mem_base + 0x1000, MARKER)
    _scrub_if_unheld(old, host, ledger, fakes.machine(), lambda _m: None)
    assert fakes.mem.read(spec.mem_base + 0x1000, len(MARKER)) == MARKER
    assert "slice 'other' (reserved) holds it now" in capsys.readouterr().err
