"""vm/plan.py: a slice's resources -> QEMU's argv, the pinning, huge pages and the NUMA node."""

from __future__ import annotations

from pathlib import Path

import pytest

from coreslice.errors import UsageError
from coreslice.host.snapshot import discover
from coreslice.vm.plan import VmResources, guest_cmdline, plan_vm

from ..hosttree import make_host_tree, two_node_srat

GIB = 1 << 30


@pytest.fixture
def host(tmp_path):
    # 4 CPUs: 0-1 on node 0 (RAM 0-2G, 4G-6G), 2-3 on node 1 (RAM 6G-10G).
    return discover(make_host_tree(tmp_path / "host", srat=two_node_srat()))


def _plan(host, hugepage_size="2M", **kw):
    res = VmResources(**{"kernel": Path("/k/vmlinuz"), "initrd": Path("/k/initrd.img"), "cpus": (3, 2),
                         "mem_size": 2 * GIB, "mem_base": 0x200000000, "cmdline": "root=LABEL=r quiet",
                         "devices": ("0000:21:10.0",), "name": "web1", **kw})
    return plan_vm(host, res, hugepage_size=hugepage_size, serial_log=Path("/tmp/s.log"),
                   qmp_socket=Path("/tmp/q.sock"))


def _opt(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_argv_has_the_slice_resources(host):
    p = _plan(host)
    a = p.argv
    assert a[0] == "qemu-system-x86_64"
    assert _opt(a, "-machine") == ["q35,accel=kvm"] and _opt(a, "-cpu") == ["host"]
    assert _opt(a, "-smp") == ["2,sockets=1,cores=2,threads=1"] and _opt(a, "-m") == ["2048M"]
    assert _opt(a, "-object") == ["memory-backend-file,id=mem0,size=2048M,prealloc=on,host-nodes=1,policy=bind,"
                                  "mem-path=/dev/hugepages,share=off"]
    assert _opt(a, "-numa") == ["node,nodeid=0,cpus=0-1,memdev=mem0"]
    assert _opt(a, "-kernel") == ["/k/vmlinuz"] and _opt(a, "-initrd") == ["/k/initrd.img"]
    assert _opt(a, "-append") == ["root=LABEL=r quiet console=ttyS0,115200n8"]
    assert _opt(a, "-device") == ["vfio-pci,host=0000:21:10.0"]
    assert _opt(a, "-serial") == ["file:/tmp/s.log"]
    assert "-nodefaults" in a and "-nographic" in a


def test_pinning_is_sorted_cpus_and_node_is_theirs(host):
    p = _plan(host)
    assert p.pinning == {0: 2, 1: 3} and p.numa_node == 1
    assert p.to_json()["pinning"] == {"0": 2, "1": 3}


def test_hugepages_count_and_backends(host):
    assert _plan(host, "1G").hugepages.to_json() == {"size": "1G", "count": 2, "node": 1}
    assert "mem-path=/dev/hugepages1G" in _opt(_plan(host, "1G").argv, "-object")[0]
    assert _plan(host, "2M").hugepages.count == 1024
    none = _plan(host, "none")
    assert none.hugepages is None and none.to_json()["hugepages"] is None
    assert _opt(none.argv, "-object") == ["memory-backend-ram,id=mem0,size=2048M,prealloc=on,host-nodes=1,policy=bind"]


def test_no_initrd_no_devices(host):
    a = _plan(host, initrd=None, devices=(), cmdline="").argv
    assert "-initrd" not in a and "-device" not in a and _opt(a, "-append") == ["console=ttyS0,115200n8"]


def test_refuses_cpus_across_nodes(host):
    with pytest.raises(UsageError, match=r"span NUMA nodes \(CPU 1 on node 0; CPU 2 on node 1\)"):
        _plan(host, cpus=(1, 2))


def test_refuses_memory_on_another_node(host):
    with pytest.raises(UsageError, match=r"CPUs 2-3 are on NUMA node 1 but its memory 2G@0x100000000 is on node 0"):
        _plan(host, mem_base=0x100000000)


def test_refuses_memory_not_a_hugepage_multiple(host):
    with pytest.raises(UsageError, match=r"memory size 1536M is not a multiple of the 1G huge page size; .*--hugepages 2M"):
        _plan(host, "1G", mem_size=1536 << 20)
    assert _plan(host, "2M", mem_size=1536 << 20).hugepages.count == 768


def test_refuses_absent_cpu(host):
    with pytest.raises(UsageError, match=r"CPU 9 not present on this host \(present: 0-3\)"):
        _plan(host, cpus=(9,))


def test_memory_without_base_takes_the_cpus_node(host):
    assert _plan(host, mem_base=None, cpus=(0, 1)).numa_node == 0


def test_guest_cmdline_drops_slice_parameters():
    recorded = ("console=uart,io,0x2f8,115200n8 noapic no_ipi_broadcast=1 tsc_early_khz=2496012 tsc=reliable no5lvl "
                "reboot=efi panic=0 efi=runtime pci=off reserve=0x2f8,0x8 root=LABEL=r quiet")
    assert guest_cmdline(recorded) == "root=LABEL=r quiet"
    assert guest_cmdline(None) == ""
