"""host check --profile vm-host on synthetic trees: each item goes from fail/warn to ok as the
thing it names appears."""

from __future__ import annotations

import json

from coreslice.cli import main
from coreslice.host import vmready

from ..hosttree import make_host_tree


def _items(root):
    return {i.name: i for i in vmready.check(root).items}


def _ready_tree(root):
    (root / "dev").mkdir(parents=True, exist_ok=True)
    (root / "dev/kvm").touch()
    for d in ("sys/kernel/iommu_groups/7", "sys/bus/pci/drivers/vfio-pci", "sys/kernel/mm/hugepages/hugepages-1048576kB"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc/mounts").write_text("hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n"
                                      "none /dev/hugepages1G hugetlbfs rw,relatime,pagesize=1024M 0 0\n")
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    (root / "usr/bin/qemu-system-x86_64").touch()
    return root


def test_an_empty_tree_fails_and_says_what_to_do(tmp_path):
    items = _items(tmp_path)
    assert items["kvm"].status == "fail" and "modprobe kvm_intel" in items["kvm"].fix
    assert items["iommu"].status == "warn" and "intel_iommu=on" in items["iommu"].fix
    assert items["vfio"].status == "warn"
    assert items["hugepages"].status == "fail" and "mount -t hugetlbfs" in items["hugepages"].fix
    assert items["hugepages-1G"].status == "warn" and "pdpe1gb" in items["hugepages-1G"].detail
    assert items["qemu"].status == "fail"
    assert not vmready.check(tmp_path).ready


def test_a_ready_tree_is_ready(tmp_path):
    items = _items(_ready_tree(tmp_path))
    assert {n: i.status for n, i in items.items()} == {n: "ok" for n in items}, items
    assert "1 IOMMU groups" in items["iommu"].detail
    assert vmready.check(tmp_path).format().endswith("ready to run comparison VMs")


def test_vfio_loadable_from_modules_dep(tmp_path):
    (tmp_path / "proc/sys/kernel").mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/osrelease").write_text("6.12.1-amd64\n")
    dep = tmp_path / "lib/modules/6.12.1-amd64/modules.dep"
    dep.parent.mkdir(parents=True)
    dep.write_text("kernel/drivers/vfio/vfio.ko.xz:\n")
    assert _items(tmp_path)["vfio"].status == "warn"
    dep.write_text("kernel/drivers/vfio/pci/vfio-pci.ko.xz: kernel/drivers/vfio/vfio.ko.xz\n")
    item = _items(tmp_path)["vfio"]
    assert item.status == "ok" and item.fix == "modprobe vfio-pci"


def test_a_1g_pool_without_its_mount_warns(tmp_path):
    _ready_tree(tmp_path)
    (tmp_path / "proc/mounts").write_text("hugetlbfs /dev/hugepages hugetlbfs rw,relatime 0 0\n")
    items = _items(tmp_path)
    assert items["hugepages"].status == "ok"  # no pagesize=: the default size, 2M on x86
    assert items["hugepages-1G"].status == "warn" and "/dev/hugepages1G" in items["hugepages-1G"].detail


def test_cli_profile_vm_host(tmp_path, capsys):
    make_host_tree(tmp_path)  # --root takes captured host trees only
    _ready_tree(tmp_path)
    assert main(["host", "check", "--profile", "vm-host", "--root", str(tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ready"] and {i["name"] for i in doc["items"]} >= {"kvm", "iommu", "vfio", "hugepages", "qemu"}
    (tmp_path / "dev/kvm").unlink()
    assert main(["host", "check", "--profile", "vm-host", "--root", str(tmp_path)]) == 1
    assert "NOT ready to run comparison VMs" in capsys.readouterr().out
