"""SR-IOV VF preparation against the in-memory fake: every refusal before any change, the
steps in order, undo after a failure, the slice kernel's parameters, and the host show table."""

import argparse
from pathlib import Path

import pytest

from coreslice import config
from coreslice.plan import vfs as sriov
from coreslice.launch import vfprep
from coreslice.machine import sriov as ops_mod
from coreslice.launch import session
from coreslice.errors import LaunchError, UsageError
from coreslice.host.pci import Function

NIC, NVME = "0000:01:00.0", "0000:02:00.0"
CFG = config.parse(f'[sriov]\nnic = ["{NIC}"]\nnvme = ["{NVME}"]\nmac_base = "02:c5:00:00:10:00"\n').sriov


def host():
    ops = ops_mod.FakeOps()
    ops.add_pf(NIC, 0x020000, 7, driver="igb", ifname="eth0")
    ops.add_pf(NVME, 0x010802, 4, driver="nvme", nvme="nvme0")
    ops.add_pf("0000:03:00.0", 0x070002, 2, driver="serial")
    ops.devs["0000:04:00.0"] = {"class": "0x020000", "driver": "e1000e"}   # no SR-IOV
    return ops


def checked(ops, *reqs, held=None):
    return sriov.check(list(reqs), ops, CFG, held or {})


def req(kind, pf, i, mac=None):
    return sriov.VfRequest(kind, pf, i, mac)


def test_parse_vf():
    assert sriov.parse_vf("0000:99:00.0:3", "nic") == req("nic", "0000:99:00.0", 3)
    assert sriov.parse_vf("99:00.0:0", "nvme").pf == "0000:99:00.0"
    for bad in ("0000:99:00.0", "x:1", "0000:99:00.0:a"):
        with pytest.raises(UsageError, match="PF:INDEX"):
            sriov.parse_vf(bad, "nic")


def test_mac_needs_one_nic():
    with pytest.raises(UsageError, match="exactly one --nic-vf"):
        sriov.with_mac([req("nvme", NVME, 0)], "02:00:00:00:00:01")
    with pytest.raises(UsageError, match="not a MAC"):
        sriov.with_mac([req("nic", NIC, 0)], "02:00:00")
    with pytest.raises(UsageError, match="multicast"):
        sriov.with_mac([req("nic", NIC, 0)], "03:00:00:00:00:01")
    assert sriov.with_mac([req("nic", NIC, 0)], "02:AA:00:00:00:01")[0].mac == "02:aa:00:00:00:01"


@pytest.mark.parametrize("r, held, words", [
    (req("nic", "0000:09:00.0", 0), {}, ["no PCI function 0000:09:00.0"]),
    (req("nic", NVME, 0), {}, ["not a NIC", "0x010802"]),
    (req("nvme", NIC, 0), {}, ["not an NVMe controller"]),
    (req("nic", "0000:04:00.0", 0), {}, ["not SR-IOV capable"]),
    (req("nic", NIC, 7), {}, ["has 7 VFs", "below 7"]),
    (req("nvme", NVME, 4), {}, ["has 4 VFs"]),
    (req("nic", NIC, 0), {NIC: "a"}, ["PF 0000:01:00.0 itself is held by slice 'a'"]),
])
def test_refusals_before_any_change(r, held, words):
    ops = host()
    with pytest.raises(UsageError) as e:
        checked(ops, r, held=held)
    for w in words:
        assert w in str(e.value)
    assert ops.log == []


def test_refuses_held_vf_and_partial_enablement():
    ops = host()
    vfprep.prepare(checked(ops, req("nic", NIC, 1)), ops)
    vf = ops.virtfn(NIC, 1)
    with pytest.raises(UsageError, match=f"VF {vf} is held by slice 'web'"):
        checked(ops, req("nic", NIC, 1), held={vf: "web"})
    ops.devs[NVME]["sriov_numvfs"] = "2"
    with pytest.raises(UsageError, match="2 of 4 VFs enabled by someone else"):
        checked(ops, req("nvme", NVME, 0))


def test_refuses_pf_without_driver_or_netdev():
    ops = host()
    ops.devs[NIC]["driver"] = None
    with pytest.raises(UsageError, match="has no host driver"):
        checked(ops, req("nic", NIC, 0))
    ops = host()
    ops.devs[NIC]["net"] = None
    with pytest.raises(UsageError, match="no network interface"):
        checked(ops, req("nic", NIC, 0))


def test_refuses_twice_and_both_kinds():
    with pytest.raises(UsageError, match="given twice"):
        checked(host(), req("nic", NIC, 0), req("nic", NIC, 0))


def test_nvme_not_enough_flexible_resources():
    ops = host()
    ops.caps["nvme0"] = ops_mod.PrimaryCaps(4, 0, 2, 1, 4, 0, 1, 1)  # 4 VQ for 4 secondaries: 1 each
    with pytest.raises(UsageError, match="needs 2"):
        checked(ops, req("nvme", NVME, 0))
    assert ops.log == []


def test_nic_prepare_steps():
    ops = host()
    prep = vfprep.prepare(checked(ops, req("nic", NIC, 2)), ops)
    vf = prep.vfs[0]
    assert vf.mac == "02:c5:00:00:10:02" and vf.address == ops.virtfn(NIC, 2)
    assert ops.log[:2] == [f"write {NIC} sriov_drivers_autoprobe=0", f"write {NIC} sriov_numvfs=7"]
    assert ops.macs[("eth0", 2)] == "02:c5:00:00:10:02"
    assert ops.driver(vf.address) is None  # autoprobe off: nothing bound it
    # a second VF of the same PF does not enable again
    ops.log.clear()
    vfprep.prepare(checked(ops, req("nic", NIC, 3, "02:00:00:00:00:33")), ops)
    assert ops.log == ["mac eth0 vf 3 02:00:00:00:00:33"]


def test_vf_bound_to_host_driver_is_unbound():
    ops = host()
    ops.devs[NIC]["sriov_numvfs"] = "7"
    ops.write_attr(NIC, "sriov_numvfs", "7")  # enabled with autoprobe on: VFs bound to vfdrv
    prep = vfprep.prepare(checked(ops, req("nic", NIC, 0)), ops)
    assert prep.vfs[0].unbound_from == "vfdrv" and ops.driver(prep.vfs[0].address) is None


def test_nvme_prepare_steps():
    ops = host()
    prep = vfprep.prepare(checked(ops, req("nvme", NVME, 1)), ops)
    assert prep.vfs[0].secondary == 2
    log = ops.log
    # resources for every secondary before the VFs exist, then online for this one
    enable = log.index(f"write {NVME} sriov_numvfs=4")
    assigns = [i for i, l in enumerate(log) if "act8" in l]
    assert len(assigns) == 8 and max(assigns) < enable
    assert log[-1] == "virt-mgmt /dev/nvme0 c2 rt0 act9 nr0"
    secs = {s.scid: s for s in ops.secondaries("/dev/nvme0")}
    assert secs[2].online and not secs[1].online and all(s.vq == 2 and s.vi == 1 for s in secs.values())


def test_nvme_online_failure_undoes_everything():
    ops = host()
    ops.fail_online = True
    with pytest.raises(LaunchError) as e:
        vfprep.prepare(checked(ops, req("nic", NIC, 0), req("nvme", NVME, 0)), ops)
    msg = str(e.value)
    assert "did not come online" in msg and "undid all" in msg
    assert ops.devs[NVME]["sriov_numvfs"] == "0" and ops.devs[NIC]["sriov_numvfs"] == "0"
    assert ops.devs[NVME]["sriov_drivers_autoprobe"] == "1" and ops.devs[NIC]["sriov_drivers_autoprobe"] == "1"
    assert all(s.vq == 0 and s.vi == 0 for s in ops.secondaries("/dev/nvme0"))
    assert ops.macs[("eth0", 0)] == "00:00:00:00:00:00"  # the MAC it had before


def test_slice_kernel_params():
    vfs = [vfprep.PreparedVf("nic", "0000:99:00.0", 1, "0000:99:00.3"),
           vfprep.PreparedVf("nvme", "0000:8d:00.0", 1, "0000:8d:00.2")]
    permit, vf = sriov.slice_kernel_params(vfs, ["0000:21:00.0"])
    assert permit == "21:00.0;99:00.3;8d:00.2"
    assert vf == "pci-vf-as-pf.pf=99:00.0,8d:00.0 pci-vf-as-pf.vf=1"
    with pytest.raises(UsageError, match="same INDEX"):
        sriov.slice_kernel_params([vfs[0], vfprep.PreparedVf("nvme", "0000:8d:00.0", 2, "x")], [])


def _req(**kw):
    from coreslice.request import boot_request
    base = dict(kernel=Path("/k"), initrd=None, console="0000:21:00.0", memory="1G", cpus=[1])
    base.update(kw)
    return boot_request(**base)


class _Host:
    def __init__(self, functions):
        from coreslice.host.pci import PciTopology
        self.pci = PciTopology([], functions)


def test_stock_kernel_refuses_vfs_before_any_change():
    ops = host()
    with pytest.raises(UsageError, match="stock kernel cannot drive an SR-IOV VF"):
        session.plan_vfs(_req(nic_vfs=[f"{NIC}:0"]), _Host([]), {}, ops)
    assert ops.log == []
    vf = Function("0000:11:00.1", 0x020000, physfn=NIC)
    with pytest.raises(UsageError, match="is an SR-IOV VF of"):
        session.plan_vfs(_req(devices=["0000:11:00.1"]), _Host([vf]), {}, ops)


def test_slice_kernel_vfs_are_planned_without_any_change(tmp_path):
    """The VFs' addresses come from the PF's SR-IOV First VF Offset and Stride before they
    exist; the plan (devices, permit list, pci-vf-as-pf) is complete and nothing is changed."""
    from coreslice import config as configmod
    ops = host()
    cfgfile = tmp_path / "c.toml"
    cfgfile.write_text(f'[sriov]\nnic = ["{NIC}"]\nmac_base = "02:c5:00:00:20:00"\n')
    req = _req(nic_vfs=[f"{NIC}:0"], nvme_vfs=[f"{NVME}:0"], guest_kernel="slice", config=configmod.load(cfgfile))
    h = _Host([Function(NIC, 0x020000, driver="igb"), Function(NVME, 0x010802, driver="nvme")])
    checked, view, pci_extra, prefix = session.plan_vfs(req, h, {}, ops)
    assert ops.log == []  # nothing enabled, no MAC set
    vfs = [c.vf for c in checked]
    assert [view.pci.function(v).physfn for v in vfs] == [NIC, NVME]
    assert pci_extra.startswith(",permit_probe_only=21:00.0;")
    assert prefix == "pci-vf-as-pf.pf=01:00.0,02:00.0 pci-vf-as-pf.vf=0"
    prep = vfprep.prepare(checked, ops)  # the act phase: the VFs appear where the plan said
    assert [v.address for v in prep.vfs] == vfs == [ops.virtfn(NIC, 0), ops.virtfn(NVME, 0)]
    assert ops.macs[("eth0", 0)] == "02:c5:00:00:20:00"


def test_parse_nvme_cli_json():
    caps = ops_mod.parse_primary_caps({"vqfrt": 8, "vqrfap": 0, "vqfrsm": 2, "vqgran": 1, "vifrt": 4,
                                     "virfap": 0, "vifrsm": 1, "vigran": 1, "cntlid": 0})
    assert caps.vqfrt == 8 and caps.vifrsm == 1
    secs = ops_mod.parse_secondaries({"num": 1, "secondary-controllers": [
        {"secondary-controller-identifier": 1, "primary-controller-identifier": 0,
         "secondary-controller-state": 1, "virtual-function-number": 1,
         "num-virtual-queues": 2, "num-virtual-interrupts": 1}]})
    assert secs == [ops_mod.Secondary(1, 1, True, 2, 1)]


def test_pf_table():
    fns = [Function(NIC, 0x020000, driver="igb", sriov_totalvfs=7, sriov_numvfs=2),
           Function("0000:01:10.2", 0x020000, physfn=NIC), Function("0000:01:10.0", 0x020000, physfn=NIC),
           Function(NVME, 0x010802, driver="nvme", sriov_totalvfs=4, sriov_numvfs=0)]
    rows = sriov.pf_table(fns, {"0000:01:10.2": "web"}, [NIC], [])
    assert [r["kind"] for r in rows] == ["nic", "nvme"] and rows[0]["configured"]
    assert [(v["index"], v["address"], v["held_by"]) for v in rows[0]["vfs"]] == \
        [(0, "0000:01:10.0", None), (1, "0000:01:10.2", "web")]
    text = "\n".join(sriov.format_pf_table(rows))
    assert "slice web" in text and "2/7 VFs" in text
