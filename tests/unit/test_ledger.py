"""The ledger: reservations, conflicts, crashed launches, host reboots, and two racing processes.

Launches run against the in-memory machine fakes; the races use real `coreslice boot`
processes on a synthetic host tree (CORESLICE_FAKE_MACHINE=1) sharing one ledger file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from coreslice import cli
from coreslice.launch import session as launch
from coreslice.errors import LaunchError, UsageError
from coreslice.host.snapshot import discover
from coreslice.ledger import DEFAULT_PATH, ENV, FALLBACK_PATH, Ledger, LedgerConflict, SliceRecord, resolve_path
from coreslice.machine.physmem import FakeMemory
from coreslice.request import BootSpec

from .hosttree import BOOT_ID, make_host_tree, two_node_srat
from .plan.test_boot import Fakes

GIB = 1 << 30
MIB = 1 << 20
SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture
def tree(tmp_path):
    return make_host_tree(tmp_path / "host", ncpus=6, srat=two_node_srat(6))


@pytest.fixture
def host(tree):
    return discover(tree)


@pytest.fixture
def ledger_path(tmp_path):
    return tmp_path / "state" / "ledger.sqlite3"


@pytest.fixture
def ledger(ledger_path):
    return Ledger(ledger_path, BOOT_ID)


@pytest.fixture
def initrd(tmp_path):
    p = tmp_path / "initrd.img"
    p.write_bytes(b"\x07" * 100_000)
    return p


@pytest.fixture
def spec(debian_kernel, initrd):
    return BootSpec(kernel=debian_kernel.vmlinuz, initrd=initrd, cpus=[1, 2], mem_size=GIB // 2,
                    mem_base=0x40000000, console="io:0x2f8", name="web")


def rec(name="a", cpus=(1,), base=GIB, size=GIB // 2, **kw) -> SliceRecord:
    return SliceRecord(name=name, cpus=tuple(cpus), apic_ids=tuple(cpus), mem_base=base, mem_size=size, **kw)


# -- the ledger alone ------------------------------------------------------------------------------

def test_reserve_records_and_refuses_every_kind_of_overlap(ledger):
    a = ledger.reserve(rec("a", (1, 2), GIB, GIB // 2, low_slot=0x20000, console="io:0x2f8",
                           devices=("0000:21:00.0",)))
    assert (a.state, a.pid, a.boot_id) == ("reserved", os.getpid(), BOOT_ID)
    for other, match in [
        (rec("b", (2, 3), 4 * GIB), r"^CPU 2 is held by slice 'a' \(CPUs 1-2, 512M@0x40000000, console io:0x2f8; reserved since"),
        (rec("b", (3,), GIB + GIB // 4), r"^memory 0x50000000-0x5fffffff is held by slice 'a'"),
        (rec("b", (3,), 4 * GIB, low_slot=0x20000), "^low-memory slot 0x20000 is held by slice 'a'"),
        (rec("b", (3,), 4 * GIB, console="io:0x2f8"), "^console io:0x2f8 is held by slice 'a'"),
        (rec("b", (3,), 4 * GIB, devices=("0000:21:00.0",)), r"^PCI function 0000:21:00.0 is held by slice 'a'"),
        (rec("b", (3,), 4 * GIB, console="0000:21:00.0"), r"^PCI function 0000:21:00.0 is held by slice 'a'"),
        (rec("a", (3,), 4 * GIB), "^a slice named 'a' exists"),
    ]:
        with pytest.raises(LedgerConflict, match=match) as e:
            ledger.reserve(other)
        assert "\n" not in str(e.value) and "coreslice stop a" in str(e.value)
        assert e.value.exit_code == 2
    assert [r.name for r in ledger.holding()] == ["a"]
    b = ledger.reserve(rec("b", (3,), 4 * GIB, low_slot=0x30000, console="io:0x3e8"))
    assert [r.name for r in ledger.holding()] == ["a", "b"] and b.id != a.id


def test_a_new_host_boot_starts_empty_and_keeps_history(ledger, ledger_path):
    a = ledger.reserve(rec("a", (1, 2)))
    ledger.begin_launch(a.id)
    ledger.finish(a.id)
    after_reboot = Ledger(ledger_path, "another-boot-id")
    assert after_reboot.holding() == []
    after_reboot.reserve(rec("a", (1, 2)))  # the same CPUs and name are free again
    history = after_reboot.slices(history=True)
    assert [(r.boot_id, r.state) for r in history] == [(BOOT_ID, "running"), ("another-boot-id", "reserved")]


def test_state_machine_and_relaunch(ledger):
    a = ledger.reserve(rec("a", (1, 2), low_slot=0x20000))
    ledger.begin_launch(a.id)
    ledger.finish(a.id)
    # Same CPUs and memory (another name is fine): a relaunch, which replaces 'a' once it writes.
    b = ledger.reserve(rec("a2", (2, 1), low_slot=0x20000))
    assert b.replaces == (a.id,)
    assert {r.name: r.state for r in ledger.holding()} == {"a": "running", "a2": "reserved"}
    ledger.begin_launch(b.id)
    assert {r.name: r.state for r in ledger.holding()} == {"a2": "launching"}
    assert ledger.get(a.id).state == "replaced"
    ledger.finish(b.id, error="read-back differs")
    got = ledger.get(b.id)
    assert (got.state, got.error) == ("failed", "read-back differs") and got.times["ended_at"]
    assert [r.name for r in ledger.holding()] == ["a2"]  # failed still holds: its CPUs may run


def test_resources_placed_as_free_never_replace_a_slice_that_took_them_meanwhile(ledger):
    """Two placed launches may choose the same free CPUs and memory; if the first has already
    run to the end when the second reserves, the second must be refused (and place again), not
    taken for a relaunch of a slice it never knew of (a race once seen in the test above)."""
    a = ledger.reserve(rec("slice-1", (1,), low_slot=0x20000))
    ledger.begin_launch(a.id)
    ledger.finish(a.id)
    with pytest.raises(LedgerConflict, match="held by slice 'slice-1'|a slice named 'slice-1' exists"):
        ledger.reserve(rec("slice-1", (1,), low_slot=0x20000), relaunch=False)
    assert ledger.reserve(rec("slice-1", (1,), low_slot=0x20000)).replaces == (a.id,)  # asked for: a relaunch


def test_a_launch_in_flight_is_not_relaunched_under_its_feet(ledger):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        a = ledger.reserve(rec("a", (1, 2)))
        ledger.begin_launch(a.id)
        # Pretend another, live process is launching it.
        import sqlite3
        with sqlite3.connect(ledger.path) as con:
            con.execute("UPDATE slices SET pid = ? WHERE id = ?", (other.pid, a.id))
        with pytest.raises(LedgerConflict, match=f"is being launched right now by process {other.pid}"):
            ledger.reserve(rec("a", (1, 2)))
    finally:
        other.kill()
        other.wait()
    # Its launcher died while launching: the CPUs may run, so it still holds, and can be relaunched.
    assert [r.state for r in ledger.holding()] == ["launching"]
    assert ledger.reserve(rec("a", (1, 2))).replaces == (a.id,)


def test_a_reservation_whose_process_died_holds_nothing(ledger):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    a = ledger.reserve(rec("a", (1, 2)))
    import sqlite3
    with sqlite3.connect(ledger.path) as con:
        con.execute("UPDATE slices SET pid = ? WHERE id = ?", (int(dead.stdout), a.id))
    assert ledger.holding() == []
    ledger.reserve(rec("b", (1, 2)))
    assert [r.name for r in ledger.slices(history=True)] == ["b"]  # the dead reservation is gone


def test_read_only_ledger_never_creates_the_file(tmp_path):
    ro = Ledger(tmp_path / "nope" / "ledger.sqlite3", BOOT_ID, readonly=True)
    assert ro.holding() == [] and ro.slices(history=True) == []
    assert not (tmp_path / "nope").exists()


def test_ledger_path_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, str(tmp_path / "env.sqlite3"))
    assert resolve_path(tmp_path / "arg.sqlite3") == tmp_path / "arg.sqlite3"
    assert resolve_path(None) == tmp_path / "env.sqlite3"
    monkeypatch.delenv(ENV)
    expected = DEFAULT_PATH if os.access("/var/lib", os.W_OK) else FALLBACK_PATH
    assert resolve_path(None) == expected


# -- launch.boot with the ledger -------------------------------------------------------------------

def test_boot_records_the_slice_before_writing(spec, host, ledger):
    fakes = Fakes()
    seen = []

    class Watching(FakeMemory):
        def write_and_check(self, addr, data):
            if not seen:  # the first write to the machine: the row must already say launching
                seen.append([(r.name, r.state) for r in ledger.holding()])
            return super().write_and_check(addr, data)

    fakes.mem = Watching()
    result = launch.boot(spec, host=host, machine=fakes.machine(), ledger=ledger)
    assert seen == [[("web", "launching")]]
    (row,) = ledger.holding()
    assert (row.name, row.state, row.cpus, row.apic_ids, row.mem_base, row.mem_size) == \
        ("web", "running", (1, 2), (1, 2), 0x40000000, GIB // 2)
    assert (row.low_slot, row.console, row.kernel) == (result.plan.slot, "io:0x2f8", str(spec.kernel))
    assert result.to_json()["slice"]["state"] == "running"


def test_refused_before_writing_leaves_no_reservation(spec, host, ledger, tmp_path):
    fakes = Fakes()
    with pytest.raises(UsageError, match="no such file"):
        launch.boot(dataclasses.replace(spec, initrd=tmp_path / "missing"), host=host, machine=fakes.machine(),
                    ledger=ledger)

    def no_msr(mode):
        raise LaunchError("/dev/cpu/0/msr missing and 'modprobe msr' failed; load the msr module")
    machine = fakes.machine()
    machine.apic = no_msr
    with pytest.raises(LaunchError, match="msr"):
        launch.boot(spec, host=host, machine=machine, ledger=ledger)
    fakes.assert_untouched()
    assert ledger.slices(history=True) == []


def test_failure_after_the_first_write_stays_reserved(spec, host, ledger):
    class Broken(FakeMemory):
        def write_and_check(self, addr, data):
            super().write_and_check(addr, data)
            return False

    fakes = Fakes()
    fakes.mem = Broken()
    with pytest.raises(LaunchError, match="read-back"):
        launch.boot(spec, host=host, machine=fakes.machine(), ledger=ledger)
    (row,) = ledger.holding()
    assert row.state == "failed" and "read-back" in row.error
    # Its CPUs stay taken ...
    with pytest.raises(LedgerConflict, match="CPU 2 is held by slice 'web'"):
        launch.boot(dataclasses.replace(spec, cpus=[2, 3], mem_base=4 * GIB, name="x"), host=host,
                    machine=Fakes().machine(), ledger=ledger)
    # ... until it is relaunched with exactly its resources.
    launch.boot(spec, host=host, machine=Fakes().machine(), ledger=ledger)
    assert [(r.name, r.state) for r in ledger.holding()] == [("web", "running")]
    assert [r.state for r in ledger.slices(history=True)] == ["replaced", "running"]


def test_a_launch_that_crashed_half_way_stays_reserved_until_reboot(spec, host, ledger, ledger_path, tree):
    """A launcher killed after its first write (os._exit in the middle of writing memory)."""
    code = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from coreslice.launch import session as launch
        from coreslice.host.snapshot import discover
        from coreslice.ledger import Ledger
        from coreslice.machine.physmem import FakeMemory
        from coreslice.machine.fake import FakeMachine
        from coreslice.request import BootSpec

        class Crashing(FakeMemory):
            def write_and_check(self, addr, data):
                os._exit(9)

        machine = FakeMachine()
        machine.mem = Crashing()
        spec = BootSpec(kernel=Path({str(spec.kernel)!r}), initrd=None, cpus=[1, 2], mem_size={GIB // 2},
                        mem_base=0x40000000, console="io:0x2f8", name="web")
        launch.boot(spec, host=discover({str(tree)!r}), machine=machine, ledger=Ledger({str(ledger_path)!r}, {BOOT_ID!r}))
    """)
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC}, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    (row,) = ledger.holding()
    assert row.state == "launching"
    with pytest.raises(LedgerConflict, match="memory 0x40000000-0x5fffffff is held by slice 'web'"):
        launch.boot(dataclasses.replace(spec, cpus=[3], name="x"), host=host, machine=Fakes().machine(),
                    ledger=ledger)
    # The host reboots: a new boot id, and nothing is held any more.
    assert Ledger(ledger_path, "rebooted").holding() == []


def test_dry_run_reserves_nothing(tree, debian_kernel, ledger_path, tmp_path, capsys):
    rc = cli.main(["boot", "--kernel", str(debian_kernel.vmlinuz), "--ncpus", "2", "--memory", "512M",
                   "--console", "io:0x2f8", "--host-root", str(tree), "--dry-run", str(tmp_path / "out"),
                   "--ledger", str(ledger_path), "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["placement"]["cpus"] == [1, 2] and doc["slice"] is None
    assert not ledger_path.exists()


def test_stop_frees_the_slice(spec, host, ledger, tree, ledger_path, monkeypatch, capsys):
    fakes = Fakes()
    result = launch.boot(spec, host=host, machine=fakes.machine(), ledger=ledger)
    slot = result.plan.slot
    row = launch.stop("web", host=host, machine=fakes.machine(), ledger=ledger).slice
    assert row.state == "stopped" and ledger.holding() == []
    # INIT went to both CPUs and the slot record is gone, so the slot is free physically too.
    assert {a for a, c in fakes.apics[-1].sent if c >> 8 & 7 == 0b101} == {1, 2}
    assert launch.read_slot_records(host, fakes.mem) == {}
    assert slot not in launch.read_slot_records(host, fakes.mem)
    with pytest.raises(UsageError, match="no slice named 'web' in this host boot"):
        launch.stop("web", host=host, machine=fakes.machine(), ledger=ledger)
    # And through the CLI (test-only fakes on a host tree).
    launch.boot(spec, host=host, machine=Fakes().machine(), ledger=ledger)
    monkeypatch.setenv("CORESLICE_FAKE_MACHINE", "1")
    assert cli.main(["stop", "web", "--host-root", str(tree), "--ledger", str(ledger_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["slice"]["state"] == "stopped"


def test_list_and_plan_commands(spec, host, ledger, tree, ledger_path, capsys):
    launch.boot(spec, host=host, machine=Fakes().machine(), ledger=ledger)
    assert cli.main(["list", "--host-root", str(tree), "--ledger", str(ledger_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in doc["slices"]] == ["web"]
    assert [(f["node"], f["cpus"]) for f in doc["free"]] == [(0, []), (1, [3, 4, 5])]
    assert cli.main(["list", "--host-root", str(tree), "--ledger", str(ledger_path)]) == 0
    text = capsys.readouterr().out
    assert "web" in text and "running" in text and "node 1: CPUs 3-5" in text
    # plan sees what the ledger holds: the next 2 CPUs come from node 1.
    assert cli.main(["plan", "--ncpus", "2", "--memory", "1G", "--host-root", str(tree), "--ledger",
                     str(ledger_path), "--device", "0000:21:00.0", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["placement"]["cpus"] == [3, 4] and doc["placement"]["memory"]["base"] == 6 * GIB
    assert doc["devices"] == ["0000:21:00.0"]
    assert cli.main(["plan", "--ncpus", "4", "--memory", "1G", "--host-root", str(tree), "--ledger",
                     str(ledger_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "node 1: CPUs 3-5, largest memory range 4G at 0x180000000" in err


# -- two real processes at the same moment ---------------------------------------------------------

GATE = """\
import os, sys, time
from coreslice.cli import main
gate = sys.argv[1]
open(f"{gate}.ready.{os.getpid()}", "w").close()
while not os.path.exists(gate):   # every process leaves this loop within a millisecond of the others
    time.sleep(0.0005)
sys.exit(main(sys.argv[2:]))
"""


def race(argvs: list[list[str]], ledger_path: Path) -> list[subprocess.CompletedProcess]:
    """Start one `coreslice boot` per argv, all released at the same instant once every
    interpreter has imported coreslice; wait for all."""
    env = {**os.environ, "PYTHONPATH": SRC, "CORESLICE_FAKE_MACHINE": "1", ENV: str(ledger_path)}
    gate = ledger_path.with_suffix(".go")
    procs = [subprocess.Popen([sys.executable, "-c", GATE, str(gate), "boot", *argv], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for argv in argvs]
    deadline = time.time() + 60
    while len(list(gate.parent.glob(gate.name + ".ready.*"))) < len(procs) and time.time() < deadline:
        time.sleep(0.01)
    gate.touch()
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_two_boots_racing_for_the_same_cpus_exactly_one_wins(tree, debian_kernel, tmp_path):
    common = ["--kernel", str(debian_kernel.vmlinuz), "--host-root", str(tree), "--json"]
    for round_ in range(3):  # a fresh ledger each round
        ledger_path = tmp_path / f"race{round_}.sqlite3"
        a, b = race([["--cpus", "1-2", "--memory", "512M@0x40000000", "--console", "io:0x2f8", *common],
                     ["--cpus", "2-3", "--memory", "512M@0x100000000", "--console", "io:0x3e8", *common]],
                    ledger_path)
        assert sorted([a.returncode, b.returncode]) == [0, 2], (a.stderr, b.stderr)
        loser = a if a.returncode else b
        winner = b if a.returncode else a
        msg = loser.stderr.strip()
        assert msg.count("\n") == 0, msg
        assert "CPU 2 is held by slice" in msg and "coreslice stop" in msg
        assert json.loads(loser.stdout)["ok"] is False
        won = json.loads(winner.stdout)["slice"]
        rows = Ledger(ledger_path, BOOT_ID).slices(history=True)
        assert [(r.name, r.state) for r in rows] == [(won["name"], "running")]


def test_two_boots_placed_at_the_same_moment_both_get_room(tree, debian_kernel, tmp_path):
    """With --ncpus, the one that loses the reservation places again and takes the next CPUs."""
    ledger_path = tmp_path / "placed.sqlite3"
    common = ["--kernel", str(debian_kernel.vmlinuz), "--host-root", str(tree), "--ncpus", "1",
              "--memory", "512M", "--json"]
    a, b = race([[*common, "--console", "io:0x2f8"], [*common, "--console", "io:0x3e8"]], ledger_path)
    assert (a.returncode, b.returncode) == (0, 0), (a.stderr, b.stderr)
    pa, pb = (json.loads(x.stdout)["plan"] for x in (a, b))
    assert {pa["cpus"][0]["cpu"], pb["cpus"][0]["cpu"]} == {1, 2}
    assert pa["memory"]["base"] != pb["memory"]["base"]
    assert pa["low_slot"]["base"] != pb["low_slot"]["base"]
    assert len(Ledger(ledger_path, BOOT_ID).holding()) == 2


def _boot_places_again(tree, debian_kernel, ledger_path, monkeypatch, capsys) -> None:
    """A placed one-CPU boot succeeds on CPU 2 after saying it placed again."""
    monkeypatch.setenv("CORESLICE_FAKE_MACHINE", "1")
    rc = cli.main(["boot", "--kernel", str(debian_kernel.vmlinuz), "--ncpus", "1", "--memory", "512M",
                   "--console", "io:0x2f8", "--host-root", str(tree), "--ledger", str(ledger_path)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "a concurrent launch took those resources; placing again" in err
    assert "slice 'slice-2' started: CPUs 2" in out


def test_placed_boot_places_again_when_a_concurrent_launch_took_its_choice(tree, debian_kernel, ledger_path,
                                                                           monkeypatch, capsys):
    """Deterministic version of the race above: another launch reserves CPU 1 between this
    boot's placement and its reservation."""
    real_reserve = Ledger.reserve
    calls = []

    def reserve(self, rec, **kw):
        if not calls:  # the other process wins the first round
            calls.append(real_reserve(Ledger(self.path, self.boot_id), SliceRecord(
                name="other", cpus=(1,), apic_ids=(1,), mem_base=4 * GIB, mem_size=GIB, low_slot=0x80000)))
        return real_reserve(self, rec, **kw)

    monkeypatch.setattr(Ledger, "reserve", reserve)
    _boot_places_again(tree, debian_kernel, ledger_path, monkeypatch, capsys)


def test_placed_boot_places_again_when_a_launch_reserved_its_choice_while_it_planned(
        tree, debian_kernel, ledger_path, monkeypatch, capsys):
    """The other launch reserves the same CPU and memory (under the same default name) between
    this boot's placement and its early conflict check: a conflict to place again, not a relaunch
    (the flaky failure of the race test above: 'is being launched right now')."""
    real_check = Ledger.check
    calls = []

    def check(self, rec, **kw):
        if not calls:
            calls.append(Ledger(self.path, self.boot_id).reserve(SliceRecord(
                name=rec.name, cpus=rec.cpus, apic_ids=rec.apic_ids, mem_base=rec.mem_base,
                mem_size=rec.mem_size, low_slot=0x80000), relaunch=False))
            import sqlite3  # held by another live process, as in the race
            with sqlite3.connect(self.path) as con:
                con.execute("UPDATE slices SET pid = ?", (os.getppid(),))
        return real_check(self, rec, **kw)

    monkeypatch.setattr(Ledger, "check", check)
    _boot_places_again(tree, debian_kernel, ledger_path, monkeypatch, capsys)


# -- a damaged ledger file -------------------------------------------------------------------------

def _damage(kind: str, path: Path, spec, host) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "random bytes":
        path.write_bytes(bytes(range(256)) * 16)
        return
    launch.boot(spec, host=host, machine=Fakes().machine(), ledger=Ledger(path, BOOT_ID))
    if kind == "cut in half":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    else:  # a row whose JSON column is not JSON
        import sqlite3
        con = sqlite3.connect(path)
        con.execute("UPDATE slices SET cpus = 'CPUs 1-2'")
        con.commit()
        con.close()


@pytest.mark.parametrize("kind", ["random bytes", "cut in half", "column not JSON"])
@pytest.mark.parametrize("command", ["boot", "plan", "list", "stop"])
def test_a_damaged_ledger_is_refused_in_one_line(kind, command, spec, host, tree, ledger_path, debian_kernel,
                                                 monkeypatch, capsys):
    from coreslice import machine as machines
    from coreslice.machine.fake import FakeMachine

    _damage(kind, ledger_path, spec, host)
    before = ledger_path.read_bytes()
    capsys.readouterr()
    argv = {"boot": ["boot", "--kernel", str(debian_kernel.vmlinuz), "--cpus", "3", "--memory", "512M@0x100000000",
                     "--console", "io:0x3e8"],
            "plan": ["plan", "--ncpus", "1", "--memory", "512M"], "list": ["list"], "stop": ["stop", "web"]}[command]
    monkeypatch.setenv("CORESLICE_FAKE_MACHINE", "1")
    with machines.using(FakeMachine()) as m:
        rc = cli.main([*argv, "--host-root", str(tree), "--ledger", str(ledger_path), "--json"])
    out, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"coreslice: error: ledger {ledger_path} is damaged (") and "move it aside" in err
    assert json.loads(out)["exit_code"] == 2
    assert m.effects() == [] and ledger_path.read_bytes() == before


def test_a_ledger_that_is_no_regular_file_is_refused_without_blocking(tmp_path):
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it for reading waits for a writer: SQLite would block there
    blocked = []

    def unblock():  # the open is in C, deaf to signals: give it a writer so the test fails, not hangs
        blocked.append(True)
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    timer = threading.Timer(5, unblock)
    timer.start()
    try:
        for path in (fifo, tmp_path):
            for readonly in (True, False):
                with pytest.raises(UsageError, match="is not a regular file; pass --ledger PATH"):
                    Ledger(path, BOOT_ID, readonly=readonly).holding()
    finally:
        timer.cancel()
    assert not blocked


def test_refusals_create_no_ledger(tree, debian_kernel, ledger_path, monkeypatch, capsys):
    monkeypatch.setenv("CORESLICE_FAKE_MACHINE", "1")
    common = ["--host-root", str(tree), "--ledger", str(ledger_path)]
    assert cli.main(["stop", "nosuch", *common]) == 2
    assert cli.main(["boot", "--kernel", str(debian_kernel.vmlinuz), "--cpus", "0", "--memory", "512M@0x100000000",
                     "--console", "io:0x2f8", *common]) == 2  # CPU 0 is the host's
    assert cli.main(["plan", "--ncpus", "9", "--memory", "512M", *common]) == 2
    assert cli.main(["list", *common]) == 0
    assert not ledger_path.exists() and not ledger_path.parent.exists()


def test_a_refused_reservation_leaves_the_file_as_it_was(ledger, ledger_path):
    ledger.reserve(rec("a", (1, 2)))
    before = ledger_path.read_bytes()
    with pytest.raises(LedgerConflict):
        ledger.reserve(rec("b", (2, 3), 4 * GIB))
    assert ledger_path.read_bytes() == before
