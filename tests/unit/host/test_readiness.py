"""`coreslice host check` on synthetic host trees."""

import json

import pytest

from coreslice import cli
from coreslice.host import readiness as hostcheck

from ..hosttree import make_host_tree

READY = "console=ttyS0 maxcpus=1 mem=1G memory_corruption_check=0 intel_iommu=off"


def _items(root):
    r = hostcheck.check(root)
    return r, {i.name: i for i in r.items}


def test_ready_host(tmp_path):
    r, items = _items(make_host_tree(tmp_path, cmdline=READY, devmem=True))
    assert r.ready, r.format()
    assert {n: i.status for n, i in items.items()} == {
        "kernel": "ok", "cpus": "ok", "memory": "ok", "intremap": "ok", "msr": "ok", "devmem": "ok", "tsc": "ok",
        "lowmem-scan": "ok", "iommu": "ok"}
    assert "CPUs 1-3 are parked (APIC IDs 1,2,3)" in items["cpus"].detail
    # Free RAM: firmware RAM minus the host's (below 1 GiB) minus the first MiB.
    assert [(m.start, m.end) for m in r.free_memory] == [(0x40000000, 0x7FFDF000), (0x100000000, 0x280000000)]
    assert r.free_cpus == [1, 2, 3]
    assert "xAPIC mode" in items["intremap"].detail


def test_cli_exit_codes_and_json(tmp_path, capsys):
    good = make_host_tree(tmp_path / "good", cmdline=READY, devmem=True)
    assert cli.main(["host", "check", "--root", str(good)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("ready to launch slices")
    bad = make_host_tree(tmp_path / "bad", online="0-3", cmdline="console=ttyS0")
    assert cli.main(["host", "check", "--json", "--root", str(bad)]) == 1
    j = json.loads(capsys.readouterr().out)
    assert j["ready"] is False and j["free"]["cpus"] == []
    fails = {i["name"]: i for i in j["items"] if i["status"] == "fail"}
    assert set(fails) == {"cpus", "devmem"}
    assert "maxcpus=N" in fails["cpus"]["fix"]


def test_no_parked_cpus_and_no_free_memory(tmp_path):
    root = make_host_tree(tmp_path, online="0-3", cmdline="console=ttyS0", devmem=True)
    # The host owns all RAM: no mem=.
    (root / "proc/iomem").write_text("00001000-0009fbff : System RAM\n00100000-7ffdefff : System RAM\n"
                                     "100000000-27fffffff : System RAM\n")
    r, items = _items(root)
    assert not r.ready
    assert items["cpus"].status == "fail" and "all 4 CPUs are online (no maxcpus=)" in items["cpus"].detail
    assert items["memory"].status == "fail" and "mem=SIZE" in items["memory"].fix
    assert items["lowmem-scan"].status == "warn"


def test_xapic_with_interrupt_remapping_warns(tmp_path):
    root = make_host_tree(tmp_path, cmdline=READY, devmem=True,
                          kmsg_extra=("DMAR-IR: Enabled IRQ remapping in xapic mode",))
    r, items = _items(root)
    assert r.ready and items["intremap"].status == "warn" and "intremap=off" in items["intremap"].fix


def test_x2apic_host_needs_msr_driver(tmp_path):
    root = make_host_tree(tmp_path, apic_mode="x2apic", cmdline=READY, devmem=True,
                          kmsg_extra=("DMAR-IR: Enabled IRQ remapping in x2apic mode",))
    r, items = _items(root)
    assert items["intremap"].status == "ok" and "must be polled" in items["intremap"].detail
    # Without /dev/cpu/0/msr the mode comes from the kernel log, and the module must exist.
    (root / "dev/cpu/0/msr").unlink()
    (root / "proc/sys/kernel/osrelease").write_text("6.12.9-amd64\n")
    (root / "dev/kmsg").write_text((root / "dev/kmsg").read_text()
                                   + "6,20,0,-;APIC: Switched APIC routing to: cluster x2apic\n")
    r, items = _items(root)
    assert items["msr"].status == "fail" and not r.ready
    mods = root / "lib/modules/6.12.9-amd64"
    mods.mkdir(parents=True)
    (mods / "modules.dep").write_text("kernel/arch/x86/kernel/msr.ko.xz:\n")
    r, items = _items(root)
    assert items["msr"].status == "ok" and "modprobe msr" in items["msr"].detail and r.ready


def test_xapic_cannot_wake_large_apic_ids(tmp_path):
    from coreslice.acpi.tables import build_madt

    root = make_host_tree(tmp_path, cmdline=READY, devmem=True)
    (root / "sys/firmware/acpi/tables/APIC").write_bytes(build_madt([0x100, 0x101, 0x102], host_bsp_apic_id=0))
    r, items = _items(root)
    assert items["intremap"].status == "fail" and "--intremap on" in items["intremap"].fix


def test_iommu_translation_and_missing_tsc_warn(tmp_path):
    root = make_host_tree(tmp_path, tsc=False, cmdline="maxcpus=1 mem=1G memory_corruption_check=0",
                          devmem=True, kmsg_extra=("DMAR: IOMMU enabled",))
    r, items = _items(root)
    assert r.ready
    assert items["iommu"].status == "warn" and "--iommu on" in items["iommu"].fix  # remapping still on
    assert items["tsc"].status == "warn" and "--tsc-khz" in items["tsc"].fix


@pytest.mark.parametrize("extra, status, words", [
    (" intel_iommu=on intremap=off", "ok", "confines each slice's functions"),
    (" intel_iommu=on intremap=off iommu=pt", "fail", "passthrough"),
])
def test_an_iommu_that_translates_confines_slices_unless_passthrough(tmp_path, extra, status, words):
    root = make_host_tree(tmp_path, cmdline="maxcpus=1 mem=1G memory_corruption_check=0" + extra,
                          devmem=True, kmsg_extra=("DMAR: IOMMU enabled",))
    _r, items = _items(root)
    assert items["iommu"].status == status and words in items["iommu"].detail


@pytest.mark.parametrize("cmdline, key, value", [
    ("mem=1G mem=2G", "mem", "2G"), ("maxcpus=1", "mem", None), ("a memx=3", "mem", None)])
def test_cmdline_value_last_wins(cmdline, key, value):
    assert hostcheck.cmdline_value(cmdline, key) == value
