"""image install's order and undo, against a stand-in controller (nvme ops recorded, not run).

The nvme commands themselves are tested against recorded nvme-cli output (tests/unit/nvme) and,
for real, inside the emulated host (tests/e2e/test_sriov_host.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from coreslice.errors import CoresliceError, UsageError
from coreslice.image import build as buildmod
from coreslice.image import install as inst
from coreslice.ledger import Ledger
from coreslice.nvme import ops


@dataclass
class Info:
    cntlid: int = 0
    pci: str = "0000:00:06.0"
    subnqn: str = "nqn.test"


class Cli:
    def __init__(self, log):
        self.log = log

    def text(self, *args):
        self.log.append(args)
        return ""


@dataclass
class Ctrl:
    name: str = "nvme0"
    dev: str = "/dev/nvme0"
    cli: object = None


@dataclass
class Sec:
    scid: int = 2


@dataclass
class Ns:
    controllers: list
    size_bytes: int = 1 << 30


@pytest.fixture
def calls(monkeypatch, tmp_path):
    log: list[tuple] = []
    attached = {1: [], 2: [0x41]}
    monkeypatch.setattr(ops, "controller_info", lambda c: Info())
    monkeypatch.setattr(ops, "vf_secondary", lambda c, i: Sec())
    monkeypatch.setattr(ops, "namespace", lambda c, n: Ns(list(attached[n])))
    def rec(name, ret=None):
        def f(*a, **kw):
            log.append((name, *a[1:]))
            return ret
        return f
    monkeypatch.setattr(ops, "create", rec("create", 7))
    monkeypatch.setattr(ops, "wait_block_device", rec("wait", "/dev/nvme0n7"))
    monkeypatch.setattr(buildmod, "obtain_tarball", lambda c, p, t: (tmp_path / "r.tar", {}))
    monkeypatch.setattr(buildmod, "needed_bytes", lambda info: 200 << 20)
    from coreslice.image import rootfs
    monkeypatch.setattr(rootfs, "scan_tarball", lambda p: None)
    monkeypatch.setattr(ops, "detach", rec("detach"))
    monkeypatch.setattr(ops, "attach", rec("attach"))
    monkeypatch.setattr(ops, "delete", rec("delete"))
    monkeypatch.setattr(buildmod, "check", lambda req, with_target=True: None)
    monkeypatch.setattr(inst, "_ledger", lambda p: Ledger(tmp_path / "l.sqlite3", "boot-1"))
    return log


def _req(tmp_path, **kw):
    b = buildmod.BuildRequest(target=Path("/dev/null"), out_dir=tmp_path / "out", rootfs=str(tmp_path / "r.tar"))
    return inst.InstallRequest(pf="nvme0", vf_index=1, build=b, **kw)


def test_create_attach_build_detach_give_to_vf_record(calls, monkeypatch, tmp_path):
    built = []
    monkeypatch.setattr(buildmod, "build", lambda b, p: built.append(b.target) or {"label": "x"})
    r = inst.install(_req(tmp_path, size=1 << 30), ctrl=Ctrl(cli=Cli(calls)))
    assert calls == [("create", 1 << 30, 4096), ("attach", 7, [0]), ("ns-rescan", "/dev/nvme0"), ("wait", 7, 10.0),
                     ("detach", 7, [0]), ("attach", 7, [2])]
    assert built == [Path("/dev/nvme0n7")]
    assert (r["nsid"], r["created"], r["secondary_controller"]) == (7, True, 2)
    [row] = Ledger(tmp_path / "l.sqlite3", "boot-1").namespaces()
    assert (row["nsid"], row["vf_index"], row["cntlid"], row["created"]) == (7, 1, 2, 1)


def test_a_build_failure_undoes_attach_and_create(calls, monkeypatch, tmp_path):
    def fail(b, p):
        raise UsageError("--target /dev/nvme0n7 has 8 MiB, the image needs 140 MiB; give a larger device")
    monkeypatch.setattr(buildmod, "build", fail)
    with pytest.raises(UsageError) as e:
        inst.install(_req(tmp_path, size=1 << 30), ctrl=Ctrl(cli=Cli(calls)))
    assert "undone: detach namespace 7 from the host, delete namespace 7" in str(e.value)
    assert calls[-2:] == [("detach", 7, [0]), ("delete", 7)]
    assert Ledger(tmp_path / "l.sqlite3", "boot-1").namespaces() == []


def _vf_attach_fails(monkeypatch) -> None:
    """Attaching to the host works; attaching to the VF's secondary controller (0x2) fails."""
    def attach(c, nsid, ctrls):
        if ctrls == [2]:
            raise CoresliceError("nvme attach-ns failed: Invalid Controller Identifier")
    monkeypatch.setattr(ops, "attach", attach)


def test_a_failure_giving_it_to_the_vf_undoes_back_to_the_start(calls, monkeypatch, tmp_path):
    monkeypatch.setattr(buildmod, "build", lambda b, p: {})
    _vf_attach_fails(monkeypatch)
    with pytest.raises(CoresliceError, match="undone: delete namespace 7"):
        inst.install(_req(tmp_path, size=1 << 30), ctrl=Ctrl(cli=Cli(calls)))
    assert calls[-1] == ("delete", 7)


@pytest.mark.parametrize("kw, msg", [({"size": 1 << 30, "nsid": 1}, "exactly one"), ({}, "exactly one"),
                                      ({"nsid": 2}, "attached to controller")])
def test_refusals_change_nothing(calls, tmp_path, kw, msg):
    with pytest.raises(UsageError, match=msg):
        inst.install(_req(tmp_path, **kw), ctrl=Ctrl(cli=Cli(calls)))
    assert calls == []


def test_an_existing_namespace_is_not_deleted_on_failure(calls, monkeypatch, tmp_path):
    def fail(b, p):
        raise UsageError("too small")
    monkeypatch.setattr(buildmod, "build", fail)
    with pytest.raises(UsageError, match="undone: detach namespace 1 from the host$"):
        inst.install(_req(tmp_path, nsid=1), ctrl=Ctrl(cli=Cli(calls)))
    assert ("delete", 1) not in calls


def test_parse_vf():
    assert inst.parse_vf("0000:8d:00.0:1") == ("0000:8d:00.0", 1)
    assert inst.parse_vf("nvme0:3") == ("nvme0", 3)
    with pytest.raises(UsageError, match="PF:INDEX"):
        inst.parse_vf("nvme0")


def test_a_block_device_that_never_appears_still_leaves_it_detached_and_deleted(calls, monkeypatch, tmp_path):
    def never(*a):
        raise CoresliceError("no block device for namespace 7 within 10 s")
    monkeypatch.setattr(ops, "wait_block_device", never)
    with pytest.raises(CoresliceError, match="undone: detach namespace 7 from the host, delete namespace 7"):
        inst.install(_req(tmp_path, size=1 << 30), ctrl=Ctrl(cli=Cli(calls)))
    assert calls[-2:] == [("detach", 7, [0]), ("delete", 7)]


def test_too_small_a_namespace_is_refused_before_anything(calls, tmp_path):
    with pytest.raises(UsageError, match="needs 200 MiB but the namespace would have 64 MiB"):
        inst.install(_req(tmp_path, size=64 << 20), ctrl=Ctrl(cli=Cli(calls)))
    assert calls == []


def test_a_failure_after_the_build_removes_the_image_files(calls, monkeypatch, tmp_path):
    out = tmp_path / "out"
    def build(b, p):
        out.mkdir()
        for n in ("image.json", "vmlinuz", "initrd.img"):
            (out / n).write_text("x")
        return {}
    monkeypatch.setattr(buildmod, "build", build)
    _vf_attach_fails(monkeypatch)
    with pytest.raises(CoresliceError, match="removed .*image.json"):
        inst.install(_req(tmp_path, size=1 << 30), ctrl=Ctrl(cli=Cli(calls)))
    assert not any(out.iterdir())
