"""`coreslice console` and `coreslice status` on a captured host tree with the in-memory machine,
whose RAM holds a synthetic slice kernel (kernelmem.py)."""

from __future__ import annotations

import json

import pytest

from coreslice import cli
from coreslice.cli import console as consolecli
from coreslice.ledger import Ledger, SliceRecord
from coreslice.machine import using
from coreslice.machine.fake import FakeMachine

from ..hosttree import BOOT_ID, make_host_tree
from .kernelmem import MIB, SliceKernel

KEYS = {"name", "state", "reason", "uptime_s", "kernel_release", "last_log", "cpus", "memory", "on_crash", "dma"}


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("CORESLICE_FAKE_MACHINE", "1")
    tree = make_host_tree(tmp_path / "host")
    ledger = Ledger(tmp_path / "ledger.sqlite3", BOOT_ID)
    k = SliceKernel(mem_base=0x40000000, mem_size=64 * MIB)
    machine = FakeMachine(tree)
    machine.mem = k.mem
    monkeypatch.setattr(consolecli, "_sleep", lambda _s: None)
    with using(machine):
        yield tree, ledger, k, tmp_path / "ledger.sqlite3"


def add(ledger: Ledger, name: str, cpus, base: int, size: int, state: str = "running", error=None,
        on_crash=None) -> SliceRecord:
    r = ledger.reserve(SliceRecord(name=name, cpus=tuple(cpus), apic_ids=tuple(cpus), mem_base=base,
                                   mem_size=size, on_crash=on_crash))
    if state != "reserved":
        ledger.begin_launch(r.id)
    if state in ("running", "failed", "stopped"):
        ledger.finish(r.id, error)
    if state == "stopped":
        ledger.mark_stopped(r.id)
    return r


def run(capsys, tree, path, *argv):
    rc = cli.main([*argv, "--host-root", str(tree), "--ledger", str(path)])
    out, err = capsys.readouterr()
    return rc, out, err


def boot_log(k: SliceKernel) -> None:
    k.printk("Linux version 6.12.38+deb12-amd64 (debian-kernel@lists.debian.org)", 0)
    k.printk("Command line: console=ttyS1 noapic", 1_500)
    k.printk("Run /init as init process", 2_345_678_000)


def test_console_prints_the_log_like_dmesg(env, capsys):
    tree, ledger, k, path = env
    add(ledger, "web", [1], k.mem_base, k.mem_size)
    boot_log(k)
    k.mem.writes.clear()
    rc, out, err = run(capsys, tree, path, "console", "web")
    assert rc == 0, err
    assert out.splitlines() == ["[    0.000000] Linux version 6.12.38+deb12-amd64 (debian-kernel@lists.debian.org)",
                                "[    0.000001] Command line: console=ttyS1 noapic",
                                "[    2.345678] Run /init as init process"]
    assert k.mem.writes == []  # read-only


def test_console_json(env, capsys):
    tree, ledger, k, path = env
    add(ledger, "web", [1], k.mem_base, k.mem_size)
    boot_log(k)
    rc, out, _ = run(capsys, tree, path, "console", "web", "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["ok"] and doc["kernel_release"] == "6.12.38+deb12-amd64"
    assert [r["seq"] for r in doc["records"]] == [0, 1, 2] and doc["records"][2]["text"] == "Run /init as init process"


def test_console_wait_exits_at_the_first_match_printing_the_log_up_to_it(env, capsys, monkeypatch):
    tree, ledger, k, path = env
    add(ledger, "web", [1], k.mem_base, k.mem_size)
    later = iter(["Freeing unused kernel image memory: 2048K", "Run /init as init process", "after"])
    # No note yet: the kernel writes it (and logs) while we wait.
    k.mem.write(k.note_phys, bytes(32))
    from .kernelmem import note
    polls = []

    def tick(_s):
        polls.append(1)
        if len(polls) == 2:
            k.mem.write(k.note_phys, note(k.vmcoreinfo_text()))
        if len(polls) >= 2:
            k.printk(next(later), len(polls))

    monkeypatch.setattr(consolecli, "_sleep", tick)
    rc, out, err = run(capsys, tree, path, "console", "web", "--wait", "Run /init|Freeing unused kernel", "--timeout", "30")
    assert rc == 0, err
    assert [ln.split("] ", 1)[1] for ln in out.splitlines()] == ["Freeing unused kernel image memory: 2048K"]


def test_console_wait_times_out_with_one_line(env, capsys):
    tree, ledger, k, path = env
    add(ledger, "web", [1], k.mem_base, k.mem_size)
    boot_log(k)
    rc, out, err = run(capsys, tree, path, "console", "web", "--wait", "never seen", "--timeout", "0.05")
    assert rc == 1 and err.count("\n") == 1
    assert "no record of slice 'web' matched --wait 'never seen' within 0.05 s" in err
    assert "Run /init" in out  # what it did log was printed


def test_console_wait_timeout_names_an_unreadable_log(env, capsys):
    tree, ledger, k, path = env
    add(ledger, "web", [1], k.mem_base, k.mem_size)
    k.mem.write(k.note_phys, bytes(32))
    rc, _, err = run(capsys, tree, path, "console", "web", "--wait", "x", "--timeout", "0.05")
    assert rc == 1 and "its log is unreadable: no VMCOREINFO note" in err


def test_console_follow_prints_new_records_until_interrupted(env, capsys, monkeypatch):
    tree, ledger, k, path = env
    add(ledger, "web", [1], k.mem_base, k.mem_size)
    boot_log(k)
    n = []

    def tick(_s):
        n.append(1)
        if len(n) > 3:
            raise KeyboardInterrupt
        k.printk(f"tick {len(n)}", 10**9 * len(n))

    monkeypatch.setattr(consolecli, "_sleep", tick)
    rc, out, _ = run(capsys, tree, path, "console", "web", "--follow")
    assert rc == 130
    texts = [ln.split("] ", 1)[1] for ln in out.splitlines()]
    assert texts[3:] == ["tick 1", "tick 2", "tick 3"] and len(texts) == 6  # each once, in order


@pytest.mark.parametrize("argv, message", [
    (["console", "nope"], "no slice named 'nope' holds resources in this host boot"),
    (["status", "nope"], "no slice named 'nope' in the ledger"),
    (["console", "web", "--wait", "("], "--wait '(' is not a regular expression"),
    (["console", "web", "--timeout", "0"], "'0' is not a number of seconds > 0"),
])
def test_refusals_are_one_line(env, capsys, argv, message):
    tree, ledger, k, path = env
    add(ledger, "web", [1], k.mem_base, k.mem_size)
    rc, _, err = run(capsys, tree, path, *argv)
    assert rc == 2 and err.count("\n") == 1 and message in err, err


def test_console_and_status_need_root_on_the_live_host(capsys, monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    for verb in ("console", "status"):
        rc = cli.main([verb, "web"] if verb == "console" else [verb])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1
        assert f"coreslice {verb} must run as root (it reads the slice's RAM through /dev/mem); use sudo" in err


def test_another_machines_tree_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("CORESLICE_FAKE_MACHINE", raising=False)
    tree = make_host_tree(tmp_path / "host")
    rc = cli.main(["status", "--host-root", str(tree)])
    assert rc == 2 and "status reads the live host's memory only" in capsys.readouterr().err


def _other_kernel(mem_base: int) -> SliceKernel:
    return SliceKernel(mem_base=mem_base, mem_size=64 * MIB)


def test_status_json_contract_and_states(env, capsys):
    tree, ledger, k, path = env
    add(ledger, "web", [1], k.mem_base, k.mem_size, on_crash="restart")
    boot_log(k)
    # A second slice that panicked, a third that halted, one whose kernel has no note yet, one launching.
    for name, cpus, base, lines in [("db", [2], 0x50000000, ["Kernel panic - not syncing: Attempted to kill init!"]),
                                    ("batch", [3], 0x60000000, ["reboot: Power down"]),
                                    ("early", [4], 0x70000000, None)]:
        other = _other_kernel(base)
        for i, text in enumerate(lines or ["booting"]):
            other.printk(text, i)
        if lines is None:
            other.mem.write(other.note_phys, bytes(32))
        for page, data in other.mem.pages.items():
            k.mem.pages[page] = data
        add(ledger, name, cpus, base, 64 * MIB)
    add(ledger, "next", [5], 0x78000000, 64 * MIB, state="launching")
    rc, out, err = run(capsys, tree, path, "status", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert set(doc) == {"ok", "ledger", "slices"} and doc["ok"] is True and doc["ledger"] == str(path)
    by = {s["name"]: s for s in doc["slices"]}
    assert all(set(s) == KEYS for s in doc["slices"])
    web = by["web"]
    assert (web["state"], web["reason"], web["kernel_release"], web["last_log"]) == (
        "running", None, "6.12.38+deb12-amd64", "Run /init as init process")
    assert web["cpus"] == [1] and web["memory"] == {"base": k.mem_base, "size": k.mem_size}
    assert web["on_crash"] == "restart" and 0 <= web["uptime_s"] < 60
    assert (by["db"]["state"], by["db"]["reason"]) == ("panicked", "Attempted to kill init!")
    assert (by["batch"]["state"], by["batch"]["reason"]) == ("halted", "poweroff")
    assert by["early"]["state"] == "unknown" and "no VMCOREINFO note" in by["early"]["reason"]
    assert by["early"]["kernel_release"] is None and by["early"]["last_log"] is None
    assert (by["next"]["state"], by["next"]["uptime_s"], by["next"]["kernel_release"]) == ("launching", None, None)


def test_status_of_a_stopped_slice_by_name(env, capsys):
    tree, ledger, k, path = env
    add(ledger, "old", [1], k.mem_base, k.mem_size, state="stopped")
    rc, out, _ = run(capsys, tree, path, "status", "old", "--json")
    (s,) = json.loads(out)["slices"]
    assert rc == 0 and (s["state"], s["uptime_s"], s["kernel_release"]) == ("stopped", None, None)
    rc, out, _ = run(capsys, tree, path, "status", "--json")
    assert json.loads(out)["slices"] == []  # not held: only by name


def test_status_failed_gives_the_launch_error(env, capsys):
    tree, ledger, k, path = env
    add(ledger, "bad", [1], k.mem_base, k.mem_size, state="failed", error="the slice never reported")
    rc, out, _ = run(capsys, tree, path, "status", "bad", "--json")
    (s,) = json.loads(out)["slices"]
    assert (s["state"], s["reason"]) == ("failed", "the slice never reported")


def test_status_text(env, capsys):
    tree, ledger, k, path = env
    add(ledger, "web", [1], k.mem_base, k.mem_size)
    boot_log(k)
    rc, out, _ = run(capsys, tree, path, "status")
    head, row = out.splitlines()
    assert rc == 0 and head.split() == ["NAME", "STATE", "UPTIME", "KERNEL", "LAST", "LOG"]
    assert row.split()[:4] == ["web", "running", "0m00s", "6.12.38+deb12-amd64"] and row.endswith("Run /init as init process")


def test_status_keeps_the_note_address_so_the_next_call_does_not_scan(env, capsys, monkeypatch):
    from coreslice.slicelog import vmcoreinfo

    tree, ledger, k, path = env
    row = add(ledger, "web", [1], k.mem_base, k.mem_size)
    boot_log(k)
    scans = []
    real_scan = vmcoreinfo.scan
    monkeypatch.setattr(vmcoreinfo, "scan", lambda *a, **kw: scans.append(a) or real_scan(*a, **kw))
    assert run(capsys, tree, path, "status", "--json")[0] == 0
    hint = path.parent / "vmcoreinfo" / f"{BOOT_ID}-{row.id}"
    assert len(scans) == 1 and int(hint.read_text(), 16) >= k.mem_base
    rc, out, _ = run(capsys, tree, path, "status", "--json")
    assert rc == 0 and json.loads(out)["slices"][0]["state"] == "running" and len(scans) == 1
    assert run(capsys, tree, path, "console", "web")[0] == 0 and len(scans) == 1
    hint.write_text("40000000\n")  # a wrong hint: scanned again, and corrected
    assert run(capsys, tree, path, "status", "--json")[0] == 0 and len(scans) == 2
    assert int(hint.read_text(), 16) != 0x40000000


def test_status_reads_the_efi_reset_record_first(env, capsys):
    """A slice whose EFI ResetSystem stub recorded a call is halted, with the reset's kind, even
    when its log does not say so (its last lines never reached the ring) or cannot be read."""
    import struct

    from coreslice.boot import efi

    tree, ledger, k, path = env
    boot_log(k)  # the log says only that it runs
    status = k.mem_base + 32 * MIB + efi.STATUS_OFFSET
    for name, cpus, base in (("off", [1], k.mem_base), ("gone", [2], 0x50000000)):
        r = ledger.reserve(SliceRecord(name=name, cpus=tuple(cpus), apic_ids=tuple(cpus), mem_base=base,
                                       mem_size=64 * MIB, efi_status=status if name == "off" else base + 0x1F00))
        ledger.begin_launch(r.id)
        ledger.finish(r.id)

    def record(calls: int, rtype: int) -> bytes:
        return struct.pack(efi.STATUS_FORMAT, efi.STATUS_MAGIC, 1, calls, rtype, 0, 0)
    k.mem.write(status, record(0, 0))
    k.mem.write(0x50000000 + 0x1F00, record(1, 0))  # "gone": no kernel note there, ResetSystem(cold)
    by = {s["name"]: s for s in json.loads(run(capsys, tree, path, "status", "--json")[1])["slices"]}
    assert by["off"]["state"] == "running"  # the stubs ran (SVAM) but ResetSystem was not called
    assert (by["gone"]["state"], by["gone"]["reason"]) == ("halted", "reboot")
    k.mem.write(status, record(1, 2))  # ResetSystem(EfiResetShutdown)
    by = {s["name"]: s for s in json.loads(run(capsys, tree, path, "status", "--json")[1])["slices"]}
    assert (by["off"]["state"], by["off"]["reason"]) == ("halted", "poweroff")
