"""The launch session: the plan is complete before the first effect, so a refusal changes
nothing (SR-IOV included, the ledger file included); a failure before the INIT undoes what was
changed; the CLI's other verbs make the same checks.

The host is the synthetic tree (hosttree.py) with its second root bus 0x20 holding the SR-IOV
NIC 0000:21:00.0; SR-IOV effects go to an in-memory FakeOps whose VF 0 lies at 0000:21:10.0
(First VF Offset 0x80, VF Stride 1), where the tree shows it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from coreslice import cli, machine
from coreslice.errors import LaunchError, UsageError
from coreslice.launch.session import LaunchSession
from coreslice.machine.fake import FakeMachine
from coreslice.machine.sriov import FakeOps
from coreslice.request import boot_request

from ..hosttree import SRIOV_NIC, SRIOV_VF

GIB = 1 << 30


@pytest.fixture
def tree(host_tree):
    return host_tree


@pytest.fixture
def ledger_path(tmp_path):
    return tmp_path / "ledger.sqlite3"


def nic_ops() -> FakeOps:
    ops = FakeOps()
    ops.add_pf(SRIOV_NIC, 0x020000, 7, driver="igb", ifname="eth0", offset=0x80, stride=1)
    return ops


def vf_request(initrd, tree, ledger_path, **kw):
    base = dict(initrd=initrd, console="io:0x2f8", memory="512M@0x40000000", cpus=[1, 2],
                nic_vfs=[f"{SRIOV_NIC}:0"], guest_kernel="slice", host_root=tree, ledger=ledger_path)
    return boot_request(**{**base, **kw})


def test_a_vf_boot_plans_the_vf_before_enabling_it(debian_kernel, initrd, tree, ledger_path):
    ops = nic_ops()
    m = FakeMachine(sriov=ops)
    result = LaunchSession(vf_request(initrd, tree, ledger_path, kernel=debian_kernel.vmlinuz), m).run()
    plan = result.plan
    # The plan named the VF (derived from the PF's offset and stride) before any change ...
    assert [f.address for f in plan.pci.devices] == [SRIOV_VF]
    assert "permit_probe_only=21:10.0" in plan.cmdline and "pci-vf-as-pf.pf=21:00.0 pci-vf-as-pf.vf=0" in plan.cmdline
    # ... and the act phase made it so, then wrote and woke.
    assert ops.log[:2] == [f"write {SRIOV_NIC} sriov_drivers_autoprobe=0", f"write {SRIOV_NIC} sriov_numvfs=7"]
    assert [v.address for v in result.vfs] == [SRIOV_VF] and ops.macs[("eth0", 0)]
    assert m.mem.writes and m.apics and m.apics[-1].sent
    assert result.slice.state == "running"


@pytest.mark.parametrize("change, match", [
    ({"kernel": Path("/nonexistent/vmlinuz")}, "kernel /nonexistent/vmlinuz: no such file"),
    ({"cpus": [0]}, "CPU 0 is the host's boot CPU"),
    ({"memory": "512M@0x40000001"}, "not page aligned"),
    ({"console": "io:0x3f8"}, "host's own console"),
])
def test_a_refused_vf_boot_changes_nothing(debian_kernel, initrd, tree, ledger_path, change, match):
    """Kernel missing, boot CPU, bad memory, bad console: each found after the VF checks, and
    still nothing enabled, no MAC set, no memory written, no ledger file created."""
    ops = nic_ops()
    m = FakeMachine(sriov=ops)
    with pytest.raises(UsageError, match=match):
        LaunchSession(vf_request(initrd, tree, ledger_path, **{"kernel": debian_kernel.vmlinuz, **change}), m).run()
    assert ops.log == [] and m.effects() == []
    assert not ledger_path.exists()


def test_a_failure_before_the_init_is_undone(debian_kernel, initrd, tree, ledger_path):
    """The VFs are prepared, then detaching the console fails: the VF changes are undone, the
    reservation is released, no IPI was sent and no memory written."""
    ops = nic_ops()
    m = FakeMachine(sriov=ops)

    class Broken(type(m.pci)):
        def detach(self, address):
            raise LaunchError(f"unbinding {address} failed: Device or resource busy")
    m.pci = Broken()
    req = vf_request(initrd, tree, ledger_path, kernel=debian_kernel.vmlinuz, console="0000:00:03.0")
    with pytest.raises(LaunchError, match="unbinding 0000:00:03.0 failed.*; undid all 1 changes"):
        LaunchSession(req, m).run()
    assert f"write {SRIOV_NIC} sriov_numvfs=0" in ops.log  # VFs disabled again
    assert ops.devs[SRIOV_NIC]["sriov_drivers_autoprobe"] == "1"
    assert m.mem.writes == [] and all(a.sent == [] for a in m.apics)
    from coreslice.ledger import Ledger
    assert Ledger(ledger_path, "x", readonly=True).holding() == []
    assert [r.state for r in Ledger(ledger_path, "x", readonly=True).slices(history=True)] == []


def _cli(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _refused(capsys, argv, match):
    rc, out, err = _cli(capsys, *argv, "--json")
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("coreslice: error: ") and ";" in err, err
    assert match in err, err
    assert json.loads(out)["ok"] is False


@pytest.mark.parametrize("extra, match", [
    (["--cmdline", "quiet\nrw"], "--cmdline holds a control character"),
    (["--cmdline", "é" * 1500], "--cmdline holds non-ASCII characters"),
    (["--name", "a\nb"], "is not a slice name"),
    (["--name", "\x1b[2J"], "is not a slice name"),
    (["--tsc-khz", "-5"], "--tsc-khz -5 is not a TSC frequency"),
    (["--tsc-khz", str(10**30)], "is not a TSC frequency"),
    (["--nic-vf", f"{SRIOV_NIC}:\u00b2", "--guest-kernel", "slice"], "is not PF:INDEX"),
])
def test_request_checks(capsys, tree, debian_kernel, tmp_path, extra, match, monkeypatch):
    monkeypatch.setenv("CORESLICE_LEDGER", str(tmp_path / "l.sqlite3"))
    with machine.using(FakeMachine()) as m:
        _refused(capsys, ["boot", "--kernel", str(debian_kernel.vmlinuz), "--cpus", "1", "--memory",
                          "256M@0x40000000", "--console", "io:0x2f8", "--host-root", str(tree), *extra], match)
    assert m.effects() == [] and not (tmp_path / "l.sqlite3").exists()


@pytest.mark.parametrize("kind", ["file", "nonempty", "proc"])
def test_dry_run_into_something_that_is_not_a_new_directory(capsys, tree, debian_kernel, tmp_path, kind):
    target = {"file": tmp_path / "f", "nonempty": tmp_path / "d", "proc": Path("/proc/self/x")}[kind]
    if kind == "file":
        target.write_text("keep")
    elif kind == "nonempty":
        target.mkdir()
        (target / "keep").write_text("keep")
    before = sorted(p.name for p in tmp_path.iterdir())
    _refused(capsys, ["boot", "--kernel", str(debian_kernel.vmlinuz), "--cpus", "1", "--memory", "256M@0x40000000",
                      "--console", "io:0x2f8", "--host-root", str(tree), "--dry-run", str(target)], "--dry-run")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if kind == "file":
        assert target.read_text() == "keep"


@pytest.mark.parametrize("what", ["fifo", "dir", "loop"])
def test_unreadable_initrd_is_refused_before_anything(capsys, tree, debian_kernel, tmp_path, what, monkeypatch):
    p = tmp_path / "initrd"
    if what == "fifo":
        os.mkfifo(p)
    elif what == "dir":
        p.mkdir()
    else:
        os.symlink(tmp_path / "other", p)
        os.symlink(p, tmp_path / "other")
    monkeypatch.setenv("CORESLICE_LEDGER", str(tmp_path / "l.sqlite3"))
    with machine.using(FakeMachine()) as m:
        _refused(capsys, ["boot", "--kernel", str(debian_kernel.vmlinuz), "--initrd", str(p), "--cpus", "1",
                          "--memory", "256M@0x40000000", "--console", "io:0x2f8", "--host-root", str(tree)],
                 f"initrd {p}")
    assert m.effects() == [] and not (tmp_path / "l.sqlite3").exists()


@pytest.mark.parametrize("argv, match", [
    (["--cpus", "0", "--memory", "256M@0x40000000"], "CPU 0 is the host's boot CPU"),
    (["--cpus", "9", "--memory", "256M@0x40000000"], "CPU 9 is not present"),
    (["--cpus", "1", "--memory", "256M@0x40000001"], "not page aligned"),
    (["--cpus", "1", "--memory", "256M@0x10000000"], "overlaps the host's System RAM"),
])
def test_plan_with_explicit_resources_checks_them(capsys, tree, tmp_path, argv, match):
    _refused(capsys, ["plan", *argv, "--host-root", str(tree), "--ledger", str(tmp_path / "l")], match)
    assert not (tmp_path / "l").exists()


def test_plan_refuses_what_a_slice_holds(capsys, tree, debian_kernel, initrd, tmp_path):
    ledger = tmp_path / "l"
    req = boot_request(kernel=debian_kernel.vmlinuz, initrd=initrd, console="io:0x2f8", memory="512M@0x40000000",
                       cpus=[1, 2], host_root=tree, ledger=ledger, name="web")
    LaunchSession(req, FakeMachine()).run()
    _refused(capsys, ["plan", "--cpus", "2", "--memory", "256M@0x100000000",
                      "--host-root", str(tree), "--ledger", str(ledger)], "held by slice 'web'")


def test_config_named_is_read_and_checked_even_when_not_needed(capsys, tree, debian_kernel, tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text("[slice]\nncpus = 'two'\n")
    with machine.using(FakeMachine()) as m:
        _refused(capsys, ["boot", "--kernel", str(debian_kernel.vmlinuz), "--cpus", "1", "--memory",
                          "256M@0x40000000", "--console", "io:0x2f8", "--host-root", str(tree),
                          "--config", str(bad)], str(bad))
    assert m.effects() == []


def test_undoing_a_detach_lifts_the_override_of_a_function_that_had_no_driver():
    """detach sets driver_override on every function it takes, driver or not; a failure before
    the INIT gives each back: bound to its old driver, or only allowed drivers again."""
    from types import SimpleNamespace

    from coreslice.launch.acting import Acted, UndoLog, prepare_devices
    from coreslice.machine.pci import FakePci

    class Pci(FakePci):
        def detach(self, address):
            super().detach(address)
            return {"0000:00:03.0": "serial"}.get(address)
    fns = [SimpleNamespace(address=a, role=r, driver=None) for a, r in (("0000:00:03.0", "console"),
                                                                        ("0000:21:00.0", "device"))]
    m = SimpleNamespace(pci=Pci())
    undo, acted = UndoLog(), Acted()
    prepare_devices(SimpleNamespace(pci=SimpleNamespace(functions=fns)), [], m, lambda s: None, acted, undo)
    assert acted.detached == {"0000:00:03.0": "serial", "0000:21:00.0": None}
    assert undo.undo() == "undid all 2 changes made before the failure"
    assert m.pci.attached == [("0000:21:00.0", None), ("0000:00:03.0", "serial")]
