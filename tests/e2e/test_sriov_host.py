"""Host-side SR-IOV preparation for real, inside the emulated host (``testbed run --sriov``).

One QEMU boot (~30 s under TCG) with an igb NIC (7 VFs) and an nvme controller with 4 secondary
controllers (testbed/sriov.py).  Host commands run `coreslice sriov prepare` there and read back
what the kernel, netlink and the NVMe controller say: VFs created, the VF's MAC in `ip link`,
its secondary controller online with its flexible resources, the VFs bound to no host driver.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import coreslice

pytestmark = pytest.mark.e2e
SRC = Path(coreslice.__file__).resolve().parents[1]
# PFs by vendor:device (QEMU's nvme VFs have the PF's IDs: only PFs have sriov_totalvfs)
FIND = ('pf() { for d in /sys/bus/pci/devices/*; do [ -e $d/sriov_totalvfs ] && '
        '[ "$(cat $d/vendor):$(cat $d/device)" = "$1" ] && basename $d; done; }; NIC=$(pf 0x8086:0x10c9); NVME=$(pf 0x1b36:0x0010); '
        'printf "[sriov]\\nnic = [\\"$NIC\\"]\\nnvme = [\\"$NVME\\"]\\nmac_base = \\"02:c5:00:00:10:00\\"\\n" '
        '> /tmp/cs.toml; export CORESLICE_CONFIG=/tmp/cs.toml; ')


@pytest.fixture(scope="module")
def image_tar():
    """A small synthetic root where the emulated host can read it (the cache: shared read-only;
    the host's /tmp is its own)."""
    import importlib.util
    from coreslice.testbed.paths import cache_dir
    spec = importlib.util.spec_from_file_location(
        "rootfs_fixture", Path(__file__).resolve().parents[1] / "unit" / "image" / "rootfs_fixture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    d = cache_dir() / "test-data"
    d.mkdir(exist_ok=True)
    return mod.make_root(d / f"install-root-{os.getpid()}.tar")


@pytest.fixture(scope="module")
def result(testbed_ready, image_tar):
    install = (f'python3 -m coreslice image install --rootfs {image_tar} --out-dir /tmp/img1 --quiet '
               '--nvme-vf $NVME:1')
    cmds = [
        # 0: refused before any change: index beyond the VFs, a NIC given as NVMe, a VF for a stock kernel
        FIND + 'python3 -m coreslice sriov prepare --nic-vf $NIC:7; echo rc=$?; '
               'python3 -m coreslice sriov prepare --nvme-vf $NIC:0; echo rc=$?; '
               'python3 -m coreslice boot --kernel /nonexistent --cpus 1 --memory 64M@0x40000000 '
               '--console io:0x2f8 --nic-vf $NIC:0 --dry-run /tmp/d; echo rc=$?; '
               'cat /sys/bus/pci/devices/$NIC/sriov_numvfs /sys/bus/pci/devices/$NVME/sriov_numvfs',
        # 1: the preparation
        FIND + 'python3 -m coreslice sriov prepare --nic-vf $NIC:1 --nvme-vf $NVME:1 --json',
        # 2: what the host sees afterwards
        FIND + 'ip link show $(ls /sys/bus/pci/devices/$NIC/net); '
               'nvme list-secondary /dev/$(ls /sys/bus/pci/devices/$NVME/nvme) --output-format=json',
        # 3: VFs enabled, bound to nothing
        FIND + 'for p in $NIC $NVME; do echo numvfs $p $(cat /sys/bus/pci/devices/$p/sriov_numvfs); '
               'for v in /sys/bus/pci/devices/$p/virtfn*; do echo vf $(basename $(readlink $v)) '
               'driver=$(basename "$(readlink $v/driver)"); done; done',
        # 4: host show lists the PFs with their VFs
        FIND + 'python3 -m coreslice host show --json',
        # 5: a slice-kernel boot plan with those VFs (dry run: the prototype's slice kernel is not
        # available here, a stock kernel is refused VFs)
        FIND + f'python3 -m coreslice boot --kernel {testbed_ready[0].vmlinuz} --cpus 1 '
               '--memory 512M@0x40000000 --console io:0x2f8 --guest-kernel slice '
               '--nic-vf $NIC:1 --nvme-vf $NVME:1 --dry-run /tmp/dry --json',
        # 6: image install (issue 10 section 3) on the detached namespace 1, for VF 1 (online since 1)
        FIND + install + ' --nsid 1 --json; echo rc=$?',
        # 7: where namespace 1 is now, and what the ledger says
        FIND + 'C=/dev/$(ls /sys/bus/pci/devices/$NVME/nvme); nvme list-ctrl $C -n 1 -o json; '
               'ls /sys/block; python3 -c "import json,sqlite3; c=sqlite3.connect(\'/run/coreslice/ledger.sqlite3\'); '
               'print(json.dumps([list(r) for r in c.execute(\'select nsid, vf_index, cntlid, created from namespaces\')]))"',
        # 8: refused, nothing changed: ns 1 is attached (to the VF); VF 3's controller is offline;
        # ns 2 (8 MiB) is too small for the tree (found before the attach)
        FIND + install.replace("--out-dir /tmp/img1", "--out-dir /tmp/img2") + ' --nsid 1; echo rc=$?; '
               + install.replace("--out-dir /tmp/img1", "--out-dir /tmp/img3").replace("$NVME:1", "$NVME:3")
               + ' --nsid 2; echo rc=$?; '
               + install.replace("--out-dir /tmp/img1", "--out-dir /tmp/img4") + ' --nsid 2; echo rc=$?; '
               'C=/dev/$(ls /sys/bus/pci/devices/$NVME/nvme); nvme list-ctrl $C -n 2 -o json; ls /sys/block',
        # 9: native-setup (issue 13 section 2): web1 declared with NIC VF 1 and NVMe VF 1 (whose
        # namespace 1 image install recorded), 1 CPU and 1G: what this host (maxcpus=1 mem=1G)
        # is booted with, so it passes as web1's native-eval boot.  Then --undo.
        FIND + 'mkdir -p /tmp/slices; printf "kernel = \\"%s\\"\\nconsole = \\"io:0x2f8\\"\\ncpus = \\"1\\"\\n'
               'memory = \\"1G\\"\\nguest-kernel = \\"slice\\"\\nnic-vf = [\\"$NIC:1\\"]\\nnvme-vf = [\\"$NVME:1\\"]\\n'
               'config = \\"/tmp/cs.toml\\"\\n" ' + f'{testbed_ready[0].vmlinuz} > /tmp/slices/web1.toml; '
               'export CORESLICE_SLICES_DIR=/tmp/slices; '
               'python3 -m coreslice native-setup --like web1 --address 10.99.1.2/24 --json; echo rc=$?; '
               'echo ADDR $(ip -o -4 addr show | grep 10.99.1.2); ls /sys/block | tr "\\n" " "; echo; '
               'python3 -m coreslice native-setup --like web1 --undo --json; echo rc=$?; '
               'for p in $NIC $NVME; do echo DRV $(basename "$(readlink /sys/bus/pci/devices/$p/virtfn1/driver)"); done; '
               'echo AFTER $(ip -o -4 addr show | grep -c 10.99.1.2); ls /sys/block | tr "\\n" " "',
    ]
    cmd = [sys.executable, "-m", "coreslice.cli.testbed", "run", "--sriov", "--json", "--quiet",
           "--smp", "2", "--memory", "2G", "--timeout", "300"]
    for c in cmds:
        cmd += ["--host-cmd", c]
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=320, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return json.loads(proc.stdout)["host_cmds"]


def test_refusals_change_nothing(result):
    out = result[0]["output"]
    assert out.count("rc=2") == 3, out
    assert "has 7 VFs" in out and "is not an NVMe controller" in out and "stock kernel" in out
    assert out.split()[-2:] == ["0", "0"], out  # no VF was enabled


def test_prepare_reports_vfs(result):
    assert result[1]["exit_code"] == 0, result[1]["output"]
    vfs = {v["kind"]: v for v in json.loads(result[1]["output"])["vfs"]}
    assert vfs["nic"]["mac"] == "02:c5:00:00:10:01"
    assert vfs["nvme"]["secondary_controller"] == 2
    assert vfs["nic"]["address"] != vfs["nvme"]["address"]


def test_mac_visible_and_secondary_online(result):
    out = result[2]["output"]
    assert re.search(r"vf 1\s+link/ether 02:c5:00:00:10:01", out), out
    secs = json.loads(out[out.index("{"):])["secondary-controllers"]
    by_vfn = {s["virtual-function-number"]: s for s in secs}
    assert by_vfn[2]["secondary-controller-state"] == 1
    assert by_vfn[1]["secondary-controller-state"] == 0
    assert all(s["num-virtual-queues"] == 2 and s["num-virtual-interrupts"] == 1 for s in secs)


def test_vfs_enabled_and_unbound(result):
    lines = result[3]["output"].splitlines()
    assert sorted(l.split()[-1] for l in lines if l.startswith("numvfs")) == ["4", "7"]
    vfs = [l for l in lines if l.startswith("vf ")]
    assert len(vfs) == 11 and all(l.endswith("driver=") for l in vfs), lines


def test_host_show_lists_vfs(result):
    show = json.loads(result[4]["output"])
    pfs = show["sriov"]["pfs"]
    assert {p["kind"] for p in pfs} == {"nic", "nvme"}
    assert {len(p["vfs"]) for p in pfs} == {4, 7}


def test_slice_kernel_plan_gets_the_vfs(result):
    """The VFs sit on bus 0 next to host devices: allowed for a kernel that probes only what
    permit_probe_only names; its command line carries the prototype's VF options."""
    assert result[5]["exit_code"] == 0, result[5]["output"]
    plan = json.loads(result[5]["output"])["plan"]
    vfs = [f["address"] for f in plan["pci"]["functions"]]
    assert len(vfs) == 2
    cmdline = plan["cmdline"]
    permit = re.search(r"permit_probe_only=(\S+)", cmdline).group(1)
    assert all(a[5:] in permit for a in vfs), (permit, vfs)
    assert "pci-vf-as-pf.pf=" in cmdline and "pci-vf-as-pf.vf=1" in cmdline


def test_image_install_builds_on_a_namespace_and_gives_it_to_the_vf(result):
    out = result[6]["output"]
    assert out.rstrip().endswith("rc=0"), out
    inst = json.loads(out[:out.rindex("rc=")])["install"]
    assert inst["nsid"] == 1 and inst["vf_index"] == 1 and inst["created"] is False
    assert inst["secondary_controller"] == 2  # VF 1 = VFN 2 (test_prepare_reports_vfs)
    assert re.fullmatch(r"/dev/nvme\d+n1", inst["host_block_device"]), inst
    img = inst["image"]
    assert img["label"] == "cloudimg-rootfs" and img["target"]["kind"] == "block"
    assert img["partition"]["sector_bytes"] in (512, 4096)
    # Afterwards: namespace 1 is attached to the VF's secondary controller only (not the host's,
    # so no block device is left), and the ledger says so.
    out = result[7]["output"]
    ctrls, _ = json.JSONDecoder().raw_decode(out.lstrip())
    ids = [c.get("cntlid", c.get("ctrl_id")) for c in ctrls.get("ctrl_list", [])]
    assert ids == [2], out
    assert "nvme0n1" not in out.split() and "[[1, 1, 2, 0]]" in out, out


def test_image_install_refusals_and_undo(result):
    out = result[8]["output"]
    rcs = re.findall(r"rc=(\d)", out)
    assert rcs == ["2", "2", "2"], out
    assert "namespace 1 is attached to controller(s) 0x2" in out
    assert "is offline" in out
    assert "but the namespace would have 8 MiB" in out and "undone" not in out, out
    # Namespace 2 ends attached to nothing again.
    tail = out[out.rindex("rc=") + 4:].lstrip()
    ctrls, _ = json.JSONDecoder().raw_decode(tail)
    assert ctrls["num_ctrl"] == 0 and ctrls["ctrl_list"] == [], tail


def test_native_setup_gives_the_host_the_slices_vfs(result):
    """The VFs web1 would drive, bound to the host's igbvf and nvme: the interface has web1's MAC
    and address, namespace 1 shows as a block device; --undo unbinds them and the address goes."""
    out = result[9]["output"]
    setup_text, rest = out.split("rc=", 1)
    assert rest.startswith("0"), out
    doc = json.loads(setup_text)
    vfs = {v["kind"]: v for v in doc["vfs"]}
    assert doc["profile"] == {"native_eval": True, "gaps": []}, doc
    assert vfs["nic"]["driver"] == "igbvf" and vfs["nic"]["mac"] == "02:c5:00:00:10:01"
    assert vfs["nic"]["ip"] == "10.99.1.2/24" and vfs["nvme"]["driver"] == "nvme"
    assert len(vfs["nvme"]["block_devices"]) == 1, vfs
    disk = vfs["nvme"]["block_devices"][0]
    addr_line = next(l for l in out.splitlines() if l.startswith("ADDR"))
    assert vfs["nic"]["ifname"] in addr_line and "10.99.1.2/24" in addr_line, out
    blocks_during = out.splitlines()[out.splitlines().index(addr_line) + 1].split()
    assert disk in blocks_during
    undo_doc, _ = json.JSONDecoder().raw_decode(out[out.index("{", out.index(addr_line)):])
    assert undo_doc["ok"] and undo_doc["left"] == [], undo_doc
    assert [l for l in out.splitlines() if l.startswith("DRV")] == ["DRV", "DRV"], out
    after = out[out.index("AFTER "):].split()  # the count of 10.99.1.2 addresses, then /sys/block
    assert after[:2] == ["AFTER", "0"] and disk not in after[2:], out
