"""coreslice.nvme.ops against nvme-cli 2.3 output recorded on QEMU 10 (data/qemu10) and
constructed from nvme-cli's source where QEMU has no answer (data/constructed)."""

from __future__ import annotations

import subprocess
import time

import pytest

from coreslice.errors import CoresliceError, UsageError
from coreslice.nvme import ops

from .fakes import BUILT, PF, QEMU_START, FakeRun, add_block, constructed, controller, host_tree, later


@pytest.fixture
def root(tmp_path):
    return host_tree(tmp_path / "host")


@pytest.fixture
def run():
    return FakeRun(*QEMU_START)


def refused(run: FakeRun, fn, *args, match: str, **kw) -> str:
    with pytest.raises(UsageError, match=match) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg and "; " in msg, msg
    assert run.mutations() == [], run.mutations()
    return msg


# -- reading ---------------------------------------------------------------------------------

def test_qemu_controller_info(run, root):
    info = ops.controller_info(controller(run, root))
    assert (info.cntlid, info.nn, info.tnvmcap, info.unvmcap, info.pci) == (0, 256, 0, 0, PF)
    assert info.ns_management and info.virtualization  # OACS 0x1aa: bits 3 and 7
    assert info.ns_create is False                     # ... but no opcode 0Dh in its effects log
    assert info.subnqn == "nqn.2019-08.org.qemu:coreslice-test"


def test_qemu_list_namespaces(run, root):
    ns1, ns2 = ops.list_namespaces(controller(run, root))
    assert (ns1.nsid, ns1.blocks, ns1.lba_size, ns1.controllers, ns1.block_device) == (1, 131072, 512, [0], "/dev/nvme0n1")
    assert (ns2.nsid, ns2.lba_size, ns2.lba_format, ns2.size_bytes, ns2.controllers) == (2, 4096, 4, 64 << 20, [])
    assert ns2.block_device is None


def test_flbas_index_uses_bits_6_5_as_high_bits():
    assert ops.flbas_index(0x04) == 4 and ops.flbas_index(0x21) == 17
    assert all(ops.flbas_index(ops.flbas_value(i)) == i for i in range(64))


@pytest.mark.parametrize("spec", ["/dev/nvme0", "nvme0", PF, "00:02.0"])
def test_open_controller_forms(run, root, spec):
    assert ops.open_controller(spec, cli=ops.NvmeCli(run=run), root=root).name == "nvme0"


@pytest.mark.parametrize("spec, match", [("/dev/nvme0n1", "is a namespace"), ("nvme7", "no NVMe controller nvme7"),
                                         ("0000:00:03.0", "no NVMe controller bound"), ("sda", "not an NVMe")])
def test_open_controller_refusals(run, root, spec, match):
    refused(run, ops.open_controller, spec, cli=ops.NvmeCli(run=run), root=root, match=match)


# -- the runner ----------------------------------------------------------------------------

def test_missing_nvme_cli_says_how_to_install():
    def gone(*a, **k):
        raise FileNotFoundError("nvme")
    with pytest.raises(UsageError, match=r"install nvme-cli \(apt-get install nvme-cli\)"):
        ops.NvmeCli(run=gone).json("id-ctrl", "/dev/nvme0")


def test_runner_failure_and_timeout_name_the_command():
    run = FakeRun("id-ns-all")  # QEMU: "NVMe status: Invalid Namespace or Format ..." exit 1
    with pytest.raises(CoresliceError, match=r"nvme id-ns /dev/nvme0 -n 0xffffffff -o json failed \(exit 1\): "
                                             r"NVMe status: Invalid Namespace or Format"):
        ops.NvmeCli(run=run).json("id-ns", "/dev/nvme0", "-n", "0xffffffff")

    def slow(cmd, **k):
        raise subprocess.TimeoutExpired(cmd, k["timeout"])
    with pytest.raises(CoresliceError, match="did not finish within 5s"):
        ops.NvmeCli(run=slow, timeout=5).text("ns-rescan", "/dev/nvme0")


# -- create / delete -----------------------------------------------------------------------

def test_create_refused_on_qemu_which_only_attaches(run, root):
    msg = refused(run, ops.create, controller(run, root), 8 << 30, match="no Namespace Management command")
    assert "opcode 0Dh" in msg and "QEMU" in msg
    refused(run, ops.delete, controller(run, root), 2, match="cannot delete namespaces")


def test_create_refused_without_oacs_bit_3(run, root):
    constructed(run, lambda d: {**d, "oacs": d["oacs"] & ~ops.OACS_NS_MGMT})
    refused(run, ops.create, controller(run, root), 8 << 30,
            match=r"^controller nvme0 has no namespace management \(OACS bit 3 clear\); it cannot create namespaces$")


def test_create_happy_path_runs_create_ns_with_the_4k_format(run, root):
    constructed(run).add_file("create-ns /dev/nvme0 --nsze=2097152 --ncap=2097152 --flbas=4", BUILT / "create-ns.out")
    assert ops.create(controller(run, root), 8 << 30, 4096) == 3
    assert run.mutations() == [("create-ns", "/dev/nvme0", "--nsze=2097152", "--ncap=2097152", "--flbas=4")]


def test_create_512_picks_format_0(run, root):
    constructed(run).add("create-ns /dev/nvme0 --nsze=2048 --ncap=2048 --flbas=0", "create-ns: Success, created nsid:5\n")
    assert ops.create(controller(run, root), 1 << 20, 512) == 5


@pytest.mark.parametrize("size, lba, match", [
    (500 << 30, 4096, r"has 400\.0 GiB \(429496729600 bytes\) unallocated of 1490\.4 GiB"),
    (4096 + 512, 4096, "not a positive multiple of the LBA size 4096; round it, e.g. to 8192"),
    (0, 512, "not a positive multiple"),
    (1 << 20, 1024, "LBA size 1024 is not supported here; give 512 or 4096"),
])
def test_create_refusals(run, root, size, lba, match):
    constructed(run)
    refused(run, ops.create, controller(run, root), size, lba, match=match)


def test_create_refused_when_every_nsid_is_used(run, root):
    constructed(run, lambda d: {**d, "nn": 2})
    refused(run, ops.create, controller(run, root), 1 << 20, match="already has 2 namespaces, its maximum")


def test_create_refused_without_a_plain_4k_format(run, root):
    constructed(run).add_file("id-ns /dev/nvme0 -n 0xffffffff -o json", BUILT / "id-ns-common.out",
                              lambda d: {**d, "lbafs": [f for f in d["lbafs"] if f["ds"] == 9 or f["ms"]]})
    msg = refused(run, ops.create, controller(run, root), 1 << 20, 4096, match="no LBA format of 4096-byte blocks")
    assert "formats: 512, 512+8, 512+16, 512+64, 4096+8" in msg


def test_create_without_nsid_in_output_fails_after_acting(run, root):
    constructed(run).add("create-ns /dev/nvme0 --nsze=256 --ncap=256 --flbas=4", "something else\n")
    with pytest.raises(CoresliceError, match="printed no namespace ID") as e:
        ops.create(controller(run, root), 1 << 20)
    assert e.value.exit_code == 1


def test_delete_refused_while_attached_then_deletes(run, root):
    constructed(run)
    refused(run, ops.delete, controller(run, root), 1,
            match=r"namespace 1 is attached to controller 0x0 \(this host's nvme0\); detach it first: "
                  r"coreslice nvme ns detach nvme0 1 --all")
    run.add_file("delete-ns /dev/nvme0 -n 2", BUILT / "delete-ns.out")
    ops.delete(controller(run, root), 2)
    assert run.mutations() == [("delete-ns", "/dev/nvme0", "-n", "2")]


def test_unknown_nsid_refused_everywhere(run, root):
    c = controller(run, root)
    for fn, args in ((ops.attach, (7, [0])), (ops.detach, (7,)), (ops.attach_to_host, (7,))):
        refused(run, fn, c, *args, match=r"namespace 7 does not exist on nvme0 \(namespaces: 1, 2\)")
    constructed(run)
    refused(run, ops.delete, controller(run, root), 7, match="namespace 7 does not exist")


# -- attach / detach -----------------------------------------------------------------------

def test_attach_refusals(run, root):
    c = controller(run, root)
    refused(run, ops.attach, c, 1, [0], match=r"already attached to controller 0x0 \(this host's nvme0\)")
    refused(run, ops.attach, c, 2, [9], match=r"controller 0x9 is not in nvme0's subsystem \(controllers: 0x0, 0x1, 0x2\)")
    refused(run, ops.attach, c, 2, [], match="no controller to attach to")


def test_attach_to_host_waits_for_the_block_device(run, root):
    run.use("attach-ns-2").add("ns-rescan /dev/nvme0")  # recorded: ns-rescan prints nothing
    timer = later(0.3, lambda: add_block(root, "nvme0n2", 2))
    t0 = time.monotonic()
    try:
        assert ops.attach_to_host(controller(run, root), 2, deadline=5) == "/dev/nvme0n2"
    finally:
        timer.cancel()
    assert 0.25 < time.monotonic() - t0 < 4
    assert run.mutations() == [("attach-ns", "/dev/nvme0", "-n", "2", "-c", "0")]
    assert run.calls[-1] == ("ns-rescan", "/dev/nvme0")


def test_attach_to_host_deadline_names_what_it_waited_for(run, root):
    run.use("attach-ns-2").add("ns-rescan /dev/nvme0")
    with pytest.raises(CoresliceError) as e:
        ops.attach_to_host(controller(run, root), 2, deadline=0.3)
    assert e.value.exit_code == 1 and not isinstance(e.value, UsageError)
    assert "no block device with nsid 2 in subsystem nqn.2019-08.org.qemu:coreslice-test appeared under" in str(e.value)
    assert "within 0.3s" in str(e.value)


def test_attach_to_vf_refused_before_vfs_are_enabled(run, root):
    msg = refused(run, ops.attach_to_vf, controller(run, root), 2, 0, match="VFs not yet enabled on 0000:00:02.0")
    assert f"coreslice sriov prepare --nvme-vf {PF}:0" in msg and f"echo 2 > /sys/bus/pci/devices/{PF}/sriov_numvfs" in msg


def test_attach_to_vf_refused_while_its_secondary_is_offline(run, tmp_path):
    root = host_tree(tmp_path / "h", numvfs=2)  # list-secondary: recorded, both offline
    msg = refused(run, ops.attach_to_vf, controller(run, root), 2, 0,
                  match="secondary controller 0x1 of VF 0 is offline")
    assert "nvme virt-mgmt /dev/nvme0 --cntlid=1 --rt=0 --act=8" in msg and "--act=9" in msg
    refused(run, ops.attach_to_vf, controller(run, root), 2, 2, match=r"VF 2 is not enabled .*VFs 0-1")


def test_attach_to_vf_online(tmp_path):
    run = FakeRun(*QEMU_START).use("list-secondary-online", "attach-ns-2-vf")
    root = host_tree(tmp_path / "h", numvfs=2)
    refused(run, ops.attach_to_vf, controller(run, root), 1, 0,
            match=r"^namespace 1 is attached to controller 0x0 \(this host's nvme0\); detach it first: "
                  r"coreslice nvme ns detach nvme0 1 --controller 0x0$")
    assert ops.attach_to_vf(controller(run, root), 2, 0) == 1
    assert run.mutations() == [("attach-ns", "/dev/nvme0", "-n", "2", "-c", "1")]


def test_attaching_to_the_host_a_namespace_a_vf_holds_is_refused(tmp_path):
    run = FakeRun(*QEMU_START).use("list-ctrl-n2-vf", "list-secondary-online")
    root = host_tree(tmp_path / "h", numvfs=2)
    refused(run, ops.attach_to_host, controller(run, root), 2,
            match=r"namespace 2 is attached to controller 0x1 \(secondary controller of VF 0\); detach it first")


def test_detach_refusals_and_detach(run, root):
    c = controller(run, root)
    # QEMU 10 aborts (assertion in nvme_detach_ns) on a detach of a namespace not attached: refuse it.
    refused(run, ops.detach, c, 2, match=r"namespace 2 is not attached to controller 0x0 .*attached to: none")
    refused(run, ops.detach, c, 2, all_attached=True, match="not attached to any controller")
    (root / "proc/mounts").write_text("/dev/nvme0n1p1 /mnt/img ext4 rw 0 0\n")
    refused(run, ops.detach, c, 1, match=r"namespace 1 is mounted on this host \(/dev/nvme0n1p1 on /mnt/img\); "
                                        r"unmount it first: umount /mnt/img")


def test_detach_after_attach_uses_the_recorded_state(tmp_path):
    run = FakeRun(*QEMU_START).use("list-ctrl-n2-after", "detach-ns-2")
    root = host_tree(tmp_path / "h")
    add_block(root, "nvme0n2", 2)
    assert ops.detach(controller(run, root), 2, all_attached=True) == [0]
    assert run.mutations() == [("detach-ns", "/dev/nvme0", "-n", "2", "-c", "0")]
