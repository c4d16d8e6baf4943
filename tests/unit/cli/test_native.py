"""``coreslice native-setup --like NAME [--undo]`` against the in-memory SR-IOV fake: the slice's
VFs bound to host drivers with its MAC, address and namespace; every refusal before any change;
a failure undoes everything; --undo, from the file, leaves the fake as it was before."""

from __future__ import annotations

import copy
import json

import pytest

from coreslice import cli
from coreslice.cli import native as native_cli
from coreslice.errors import LaunchError
from coreslice.launch import native as effects
from coreslice.launch.vfprep import Call, call_from_json
from coreslice.ledger import Ledger, SliceRecord
from coreslice.machine import using
from coreslice.machine.fake import FakeMachine
from coreslice.machine.sriov import FakeOps
from coreslice.plan import native as plan

from ..hosttree import make_host_tree

NIC, NVME = "0000:01:00.0", "0000:02:00.0"
BOOT_ID = "3f1c5e0e-2b7a-4a55-9d43-6f0d2d1a9c11"  # the host tree's (tests/unit/hosttree.py)
NATIVE = "console=ttyS0 memory_corruption_check=0 pci=assign-busses mem=2G maxcpus=2 intremap=off intel_iommu=off"


def fake_ops() -> FakeOps:
    ops = FakeOps()
    ops.add_pf(NIC, 0x020000, 7, driver="igb", ifname="eth0")
    ops.add_pf(NVME, 0x010802, 4, driver="nvme", nvme="nvme0")
    ops.ns_of[(NVME, 1)] = [1]  # image install attached namespace 1 to VF 1's controller
    return ops


def snapshot(ops: FakeOps):
    macs = {k: m for k, m in ops.macs.items() if m != "00:00:00:00:00:00"}  # the fake's "none" either way
    return copy.deepcopy((ops.devs, macs, [vars(s) for s in ops.secs["nvme0"]], ops.links))


@pytest.fixture
def env(tmp_path, monkeypatch, bzimage):
    """A host booted as web1's native baseline (2 CPUs online, mem=2G), web1 declared with a NIC
    VF and an NVMe VF, a ledger that records namespace 1 for VF 1, and the fake machine."""
    root = make_host_tree(tmp_path / "host", online="0-1", cmdline=NATIVE)
    monkeypatch.setattr(native_cli, "HOST_ROOT", root)
    monkeypatch.setattr(native_cli, "STATE_DIR", tmp_path / "native")
    monkeypatch.setattr(native_cli.os, "geteuid", lambda: 0)
    cfg = tmp_path / "coreslice.toml"
    cfg.write_text(f'[sriov]\nnic = ["{NIC}"]\nnvme = ["{NVME}"]\nmac_base = "02:c5:00:00:10:00"\n')
    sdir = tmp_path / "slices"
    sdir.mkdir()
    (sdir / "web1.toml").write_text(
        f'kernel = "{bzimage}"\nconsole = "io:0x2f8"\ncpus = "1-2"\nmemory = "2G"\nguest-kernel = "slice"\n'
        f'nic-vf = ["{NIC}:1"]\nnvme-vf = ["{NVME}:1"]\nconfig = "{cfg}"\n')
    monkeypatch.setenv("CORESLICE_SLICES_DIR", str(sdir))
    ledger = tmp_path / "ledger.sqlite3"
    monkeypatch.setenv("CORESLICE_LEDGER", str(ledger))
    Ledger(ledger, BOOT_ID).record_namespace(pf=NVME, subsysnqn="nqn.x", nsid=1, vf_index=1, cntlid=2,
                                             created=False, image=None)
    ops = fake_ops()
    with using(FakeMachine(sriov=ops)):
        yield {"ops": ops, "state": tmp_path / "native" / "web1.json", "root": root, "ledger": ledger,
               "cfg": cfg, "sdir": sdir, "tmp": tmp_path}


def run(capsys, *argv):
    rc = cli.main(["native-setup", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_setup_then_undo_restores_everything(env, capsys):
    ops = env["ops"]
    before = snapshot(ops)
    rc, out, err = run(capsys, "--like", "web1", "--address", "10.99.1.2/24", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["profile"] == {"native_eval": True, "gaps": []}
    vfs = {v["kind"]: v for v in doc["vfs"]}
    nic, nvme = vfs["nic"], vfs["nvme"]
    assert nic["address"] == ops.virtfn(NIC, 1) and nic["driver"] == "vfdrv"
    assert nic["mac"] == "02:c5:00:00:10:01" and ops.macs[("eth0", 1)] == nic["mac"]
    assert ops.links[nic["ifname"]] == {"up": True, "addrs": ["10.99.1.2/24"]} and nic["ip"] == "10.99.1.2/24"
    assert nvme["driver"] == "vfdrv" and nvme["namespaces"] == [1] and nvme["block_devices"] == ["nvme91n1"]
    secs = {s.scid: s for s in ops.secondaries("/dev/nvme0")}
    assert secs[2].online
    # autoprobe was 1 only for the probe: the PFs' other VFs stay off host drivers
    assert ops.devs[NIC]["sriov_drivers_autoprobe"] == ops.devs[NVME]["sriov_drivers_autoprobe"] == "0"
    assert ops.log.index(f"probe {nvme['address']}") > ops.log.index("virt-mgmt /dev/nvme0 c2 rt0 act9 nr0")
    record = json.loads(env["state"].read_text())
    assert record["boot_id"] == BOOT_ID and all({"what", "op", "args"} <= set(s) for s in record["undo"])

    rc, out, err = run(capsys, "--like", "web1", "--undo", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["ok"] and doc["left"] == [] and len(doc["undone"]) == len(record["undo"])
    assert not env["state"].exists()
    assert snapshot(ops) == before
    # newest first: the address goes while the interface is still there, then the driver
    undo_log = ops.log[ops.log.index("addr add 10.99.1.2/24 dev " + nic["ifname"]) + 1:]
    assert undo_log.index(f"addr del 10.99.1.2/24 dev {nic['ifname']}") < undo_log.index(f"unbind {nic['address']}")


def test_text_output_and_image_address(env, capsys, tmp_path):
    """Without --address the static address of the slice's image is used."""
    img = tmp_path / "img"
    img.mkdir()
    (tmp_path / "v").write_bytes(b"k")
    (tmp_path / "i").write_bytes(b"i")
    (img / "image.json").write_text(json.dumps({"vmlinuz": str(tmp_path / "v"), "initrd": str(tmp_path / "i"),
                                                "cmdline": "root=LABEL=x ro", "seed": {"address": "10.99.1.7/24"}}))
    text = (env["sdir"] / "web1.toml").read_text().replace('\nkernel = "', '\n# kernel = "')
    (env["sdir"] / "web1.toml").write_text(text + f'image = "{img}"\n')
    rc, out, err = run(capsys, "--like", "web1")
    assert rc == 0, err
    assert "10.99.1.7/24" in out and "/dev/nvme91n1" in out and "--undo" in out


@pytest.mark.parametrize("cmdline, gap", [
    ("console=ttyS0 maxcpus=1 mem=1G", "CPUs online"),
    ("console=ttyS0 maxcpus=2 mem=6G", "mem=6G, the slice has 2G"),
    ("console=ttyS0 maxcpus=2 mem=2G intel_iommu=on iommu=pt", "IOMMU"),
])
def test_wrong_profile_refused_untouched(env, capsys, monkeypatch, cmdline, gap):
    (env["root"] / "proc/cmdline").write_text(cmdline + "\n")
    if "maxcpus=1" in cmdline:
        (env["root"] / "sys/devices/system/cpu/online").write_text("0\n")
    rc, out, err = run(capsys, "--like", "web1")
    assert rc == 2 and gap in err and "--profile native-eval --host-cpus 2 --host-mem 2G" in err, err
    assert env["ops"].log == [] and not env["state"].exists()
    rc, out, err = run(capsys, "--like", "web1", "--any-profile", "--json")
    assert rc == 0 and json.loads(out)["profile"]["native_eval"] is False
    assert any("compare nothing" in w for w in json.loads(out)["warnings"])


def test_check_changes_nothing(env, capsys):
    rc, out, err = run(capsys, "--like", "web1", "--check", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["checked_only"] and {v["kind"] for v in doc["vfs"]} == {"nic", "nvme"}
    assert env["ops"].log == [] and not env["state"].exists()


def test_no_vf_driver_undoes_all(env, capsys):
    ops = env["ops"]
    before = snapshot(ops)
    ops.no_vf_driver = True
    rc, out, err = run(capsys, "--like", "web1")
    assert rc == 1 and "no host driver took" in err and "undid all" in err, err
    assert snapshot(ops) == before and not env["state"].exists()


def test_missing_namespace_device_undoes_all(env, capsys):
    ops = env["ops"]
    before = snapshot(ops)
    ops.ns_of.clear()  # the recorded namespace is no longer attached to the VF's controller
    rc, out, err = run(capsys, "--like", "web1", "--wait", "0.2")
    assert rc == 1 and "0 of the 1 namespaces" in err and "undid all" in err, err
    assert snapshot(ops) == before


def test_refusals(env, capsys, tmp_path):
    rc, _, err = run(capsys, "--like", "nosuch")
    assert rc == 2 and "no slice named 'nosuch'" in err
    rc, _, err = run(capsys, "--like", "web1", "--undo")
    assert rc == 2 and "not in place" in err
    rc, _, err = run(capsys, "--like", "web1", "--address", "10.99.1.0/24")
    assert rc == 2 and "network address" in err
    rc, _, err = run(capsys, "--like", "web1", "--address", "dhcp")
    assert rc == 2 and "not dhcp" in err
    assert env["ops"].log == []
    assert run(capsys, "--like", "web1")[0] == 0
    rc, _, err = run(capsys, "--like", "web1")
    assert rc == 2 and "already in place" in err


def test_vf_of_another_native_setup_refused(env, capsys):
    assert run(capsys, "--like", "web1")[0] == 0
    (env["sdir"] / "web2.toml").write_text((env["sdir"] / "web1.toml").read_text())
    log = list(env["ops"].log)
    rc, _, err = run(capsys, "--like", "web2")
    assert rc == 2 and "web1 (native-setup)" in err, err
    assert env["ops"].log == log


def test_record_of_another_boot_refused(env, capsys):
    assert run(capsys, "--like", "web1")[0] == 0
    d = json.loads(env["state"].read_text())
    d["boot_id"] = "another"
    env["state"].write_text(json.dumps(d))
    rc, _, err = run(capsys, "--like", "web1", "--undo")
    assert rc == 2 and "earlier host boot" in err


def test_ledger_row_wins_over_declaration(env, capsys):
    """The newest ledger row of the name, with its recorded request (here VF 2, not the
    declaration's VF 1), and its CPU count and memory (the row's)."""
    led = Ledger(env["ledger"], "an-earlier-boot")
    row = led.reserve(SliceRecord(name="web1", cpus=(1, 2), apic_ids=(1, 2), mem_base=0x40000000, mem_size=2 << 30,
                                  kernel="/k/vmlinuz", request=("--kernel", "/k/vmlinuz", "--console", "io:0x2f8",
                                                                "--guest-kernel", "slice", "--nic-vf", f"{NIC}:2",
                                                                "--config", str(env["cfg"]))))
    led.finish(row.id)
    rc, out, err = run(capsys, "--like", "web1", "--check", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["slice"]["source"].startswith(f"ledger row {row.id}")
    assert [(v["kind"], v["index"]) for v in doc["vfs"]] == [("nic", 2)]


def test_undo_keeps_what_failed(env, capsys, monkeypatch):
    assert run(capsys, "--like", "web1")[0] == 0
    ops = env["ops"]
    real = ops.set_vf_mac
    monkeypatch.setattr(ops, "set_vf_mac", lambda *a: (_ for _ in ()).throw(LaunchError("netlink down")))
    rc, _, err = run(capsys, "--like", "web1", "--undo")
    assert rc == 1 and "netlink down" in err
    record = json.loads(env["state"].read_text())["undo"]
    # stopped at the MAC: it and the older steps (VFs off, autoprobe back) are left for next time
    assert [s["op"] for s in record][-1] == "set_vf_mac" and "netlink down" in record[-1]["error"]
    assert any(s["what"].startswith("VFs of") for s in record)
    assert ops.devs[NIC]["sriov_numvfs"] == "7"  # not disabled behind the failed step
    monkeypatch.setattr(ops, "set_vf_mac", real)
    assert run(capsys, "--like", "web1", "--undo")[0] == 0 and not env["state"].exists()


# -- the pure parts -------------------------------------------------------------------------------

def _slice(ncpus=2, mem=2 << 30):
    return plan.NativeSlice("s", "x", ncpus, mem, None, (), (), None, None)


def test_profile_gaps():
    assert plan.profile_gaps(NATIVE, 2, _slice()) == []
    assert plan.profile_gaps("maxcpus=2 mem=4G mem=2G", 2, _slice()) == []  # the last mem= counts
    gaps = plan.profile_gaps("quiet", 8, _slice())
    assert len(gaps) == 2 and "maxcpus=unset" in gaps[0] and "mem=unset" in gaps[1]
    assert plan.profile_gaps("maxcpus=2 mem=2048M", 2, _slice()) == []


def test_call_round_trip_and_damaged_steps():
    ops = fake_ops()
    c = Call(ops, "write_attr", (NIC, "sriov_numvfs", "0"))
    back = call_from_json(ops, json.loads(json.dumps(c.to_json())))
    assert back == c
    for bad in ({"op": "_vf_addr", "args": []}, {"op": "probe", "args": [NIC]}, {"op": "nosuch", "args": []}, {"op": "bind", "args": "x"}, {}):
        with pytest.raises(LaunchError, match="damaged"):
            call_from_json(ops, bad)


def test_held_vfs_reads_records(tmp_path):
    st = effects.NativeState("a", BOOT_ID, [effects.NativeVf("nic", NIC, 1, "0000:11:00.1")], [], 0.0)
    effects.save_state(st, tmp_path / "a.json")
    (tmp_path / "junk.json").write_text("{")
    assert effects.held_vfs(tmp_path) == {"0000:11:00.1": "a (native-setup)"}


def test_unwritable_record_undoes_all(env, capsys, monkeypatch):
    ops = env["ops"]
    before = snapshot(ops)

    def fail(*_a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(effects, "save_state", fail)
    rc, _, err = run(capsys, "--like", "web1")
    assert rc == 1 and "No space left" in err and "undid all" in err, err
    assert snapshot(ops) == before


def test_ctrl_c_while_preparing_undoes_all(env, capsys, monkeypatch):
    ops = env["ops"]
    before = snapshot(ops)
    real = ops.virt_mgmt

    def interrupt(dev, cntlid, rt, act, nr):
        if act == 9:  # Secondary Online: after VFs were enabled and resources assigned
            raise KeyboardInterrupt
        real(dev, cntlid, rt, act, nr)
    monkeypatch.setattr(ops, "virt_mgmt", interrupt)
    assert run(capsys, "--like", "web1")[0] == 130
    assert snapshot(ops) == before and not env["state"].exists()


def test_real_block_devices_name_the_multipath_head(tmp_path):
    """With native multipath a controller's directory holds the hidden path nvme0c1n1; the disk
    is the head nvme0n1 (what /dev has)."""
    from coreslice.machine.sriov import RealOps
    ctrl = tmp_path / "sys/bus/pci/devices/0000:12:00.2/nvme/nvme1"
    for n in ("nvme0c1n1", "nvme0c1n3", "ng1n1", "device", "nvme1"):
        (ctrl / n).mkdir(parents=True)
    assert RealOps(tmp_path).block_devices("0000:12:00.2") == ["nvme0n1", "nvme0n3"]
