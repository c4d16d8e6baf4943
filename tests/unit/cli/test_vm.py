"""``coreslice vm --dry-run``: the QEMU command line and pinning plan of a slice's twin VM."""

from __future__ import annotations

import json
import shlex

import pytest

from coreslice import cli
from coreslice.acpi.tables import Srat, SratCpu, SratMemory, build_srat
from coreslice.ledger import Ledger, SliceRecord

GIB = 1 << 30
BOOT_ID = "3f1c5e0e-2b7a-4a55-9d43-6f0d2d1a9c11"  # the host tree's (tests/unit/hosttree.py)


@pytest.fixture
def two_nodes(host_tree):
    """The conftest host tree with two NUMA nodes: CPUs 0-1 and RAM 0-2G, 4-6G on node 0;
    CPUs 2-3 and RAM 6-10G on node 1."""
    srat = Srat([SratCpu(0 if n < 2 else 1, n, True, "lapic") for n in range(4)],
                [SratMemory(0, 0, 0xA0000, True), SratMemory(0, 0x100000, 0x80000000 - 0x100000, True),
                 SratMemory(0, 0x100000000, 0x80000000, True), SratMemory(1, 0x180000000, 4 * GIB, True)])
    (host_tree / "sys/firmware/acpi/tables/SRAT").write_bytes(build_srat(srat))
    return host_tree


@pytest.fixture
def ledger(tmp_path, monkeypatch):
    path = tmp_path / "ledger.sqlite3"
    monkeypatch.setenv("CORESLICE_LEDGER", str(path))  # as the rest of coreslice, vm honours it
    led = Ledger(path, BOOT_ID)
    for name, cpus, base in (("web1", (1,), 0x40000000), ("web1", (3, 2), 0x200000000), ("db", (0,), 0x60000000)):
        row = led.reserve(SliceRecord(name=name, cpus=cpus, apic_ids=cpus, mem_base=base, mem_size=2 * GIB,
                                      kernel="/k/vmlinuz", initrd="/k/initrd.img", devices=("0000:21:10.0",),
                                      cmdline="console=uart,io,0x2f8,115200n8 noapic pci=off root=LABEL=r"))
        led.finish(row.id)
        led.mark_stopped(row.id)  # stopped: the newest row of a name counts, held or not
    return path


def _run(capsys, argv):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_like_json(capsys, two_nodes, ledger):
    rc, out, err = _run(capsys, ["vm", "--like", "web1", "--dry-run", "--json", "--hugepages", "1G",
                                 "--host-root", str(two_nodes), "--serial-log", "/tmp/web1.log"])
    assert rc == 0, err
    doc = json.loads(out)
    assert set(doc) == {"argv", "pinning", "hugepages", "numa_node"}
    assert doc["pinning"] == {"0": 2, "1": 3}  # the newest web1 row, not the first
    assert doc["hugepages"] == {"size": "1G", "count": 2, "node": 1} and doc["numa_node"] == 1
    a = doc["argv"]
    assert a[:1] == ["qemu-system-x86_64"] and "-cpu" in a and a[a.index("-cpu") + 1] == "host"
    assert a[a.index("-append") + 1] == "root=LABEL=r console=ttyS0,115200n8"
    assert a[a.index("-device") + 1] == "vfio-pci,host=0000:21:10.0"
    assert a[a.index("-serial") + 1] == "file:/tmp/web1.log"


def test_flags_human_output(capsys, host_tree, tmp_path, monkeypatch):
    monkeypatch.setenv("CORESLICE_LEDGER", str(tmp_path / "none.sqlite3"))
    rc, out, err = _run(capsys, ["vm", "--kernel", "/k/vm linuz", "--cpus", "2-3", "--memory", "1G",
                                 "--cmdline", "quiet", "--dry-run", "--hugepages", "none", "--host-root", str(host_tree)])
    assert rc == 0, err
    lines = out.splitlines()
    argv = shlex.split(lines[0])
    assert argv[argv.index("-kernel") + 1] == "/k/vm linuz" and argv[argv.index("-m") + 1] == "1024M"
    assert "memory-backend-ram" in argv[argv.index("-object") + 1]
    assert lines[1] == "pinning (NUMA node 0): vCPU 0 -> CPU 2, vCPU 1 -> CPU 3"


@pytest.mark.parametrize("argv, message", [
    (["--like", "nope"], "no slice named 'nope' in the ledger {ledger} (known: db, web1); give one of those to --like"),
    (["--kernel", "/k", "--cpus", "1-2", "--memory", "2G"], "the slice's CPUs span NUMA nodes (CPU 1 on node 0; "
                                                             "CPU 2 on node 1)"),
    (["--kernel", "/k", "--cpus", "2", "--memory", "1536M", "--hugepages", "1G"],
     "memory size 1536M is not a multiple of the 1G huge page size"),
    (["--like", "web1", "--cpus", "1"], "--like takes the slice's resources; drop --cpus, or drop --like"),
    (["--cpus", "1"], "no slice to copy: give --like NAME, or --kernel PATH, --memory SIZE as for coreslice boot"),
])
def test_refusals_are_one_line(capsys, two_nodes, ledger, argv, message):
    rc, out, err = _run(capsys, ["vm", *argv, "--dry-run", "--host-root", str(two_nodes)])
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("coreslice: error: " + message.format(ledger=ledger)), err


def test_without_dry_run_a_captured_host_is_refused(capsys, two_nodes, ledger):
    rc, out, err = _run(capsys, ["vm", "--like", "web1", "--host-root", str(two_nodes)])
    assert rc == 2 and out == ""
    assert err == (f"coreslice: error: --host-root {two_nodes} describes another machine; a VM runs only on this "
                   "one (use --dry-run to plan for a captured host)\n")


@pytest.fixture
def preflight(two_nodes, tmp_path, monkeypatch):
    """_preflight against the two-node tree, as if it were the live host: root, QEMU and KVM there,
    an existing kernel; each test then breaks one thing."""
    import argparse

    from coreslice.cli import vm as cvm
    from coreslice.host.snapshot import discover
    from coreslice.vm.plan import plan_vm

    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    monkeypatch.setattr(cvm.os, "geteuid", lambda: 0)
    monkeypatch.setattr(cvm.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(cvm, "RUN_DIR", tmp_path / "run")
    monkeypatch.setattr(cvm, "LIVE_ROOT", two_nodes)
    (two_nodes / "dev").mkdir(exist_ok=True)
    (two_nodes / "dev/kvm").write_text("")
    host = discover(two_nodes)
    import dataclasses
    host.cpus = [dataclasses.replace(c, online=True) for c in host.cpus]  # booted in its VM profile

    def check(cpus=(2, 3), devices=(), accel="kvm", hugepages="none", kernel=kernel):
        res = cvm.VmResources(kernel=kernel, initrd=None, cpus=cpus, mem_size=1 << 30, mem_base=None,
                              cmdline="", devices=devices, name="t")
        plan = plan_vm(host, res, hugepage_size=hugepages, serial_log=tmp_path / "s.log",
                       qmp_socket=tmp_path / "q.sock", accel=accel)
        args = argparse.Namespace(host_root=cvm.Path("/"), accel=accel)
        return cvm._preflight(plan, res, host, args)
    check.cvm, check.host = cvm, host
    return check


def test_preflight_passes_on_a_ready_host(preflight):
    assert preflight() == {}


def test_preflight_refusals(preflight, two_nodes, monkeypatch, tmp_path):
    from coreslice.errors import UsageError

    def refused(**kw):
        with pytest.raises(UsageError) as e:
            preflight(**kw)
        return str(e.value)

    assert refused(kernel=tmp_path / "missing") == (f"the kernel {tmp_path / 'missing'} is not a file; "
                                                    "give an existing --kernel")
    assert refused(devices=("0000:99:00.0",)).startswith("PCI function 0000:99:00.0 is not on this host")
    assert refused(hugepages="2M").startswith("this host has no 2M huge page pool on node 1 (no ")
    (two_nodes / "dev/kvm").unlink()
    assert refused().startswith("no /dev/kvm: KVM is not loaded")
    assert preflight(accel="tcg") == {}
    (two_nodes / "dev/kvm").write_text("")
    # a VM of the same name already running
    (tmp_path / "run/t").mkdir(parents=True)
    (tmp_path / "run/t/qemu.pid").write_text(f"{__import__('os').getpid()}\n")
    assert refused().startswith(f"a VM named t is already running (QEMU pid {__import__('os').getpid()}")
    (tmp_path / "run/t/qemu.pid").write_text("999999999\n")  # stale: no such process
    assert preflight() == {}
    import dataclasses
    preflight.host.cpus = [dataclasses.replace(c, online=c.cpu != 3) for c in preflight.host.cpus]
    assert refused().startswith("CPUs 3 are offline on this host (booted for slices?)")
    monkeypatch.setattr(preflight.cvm.shutil, "which", lambda name: None)
    assert refused() == "qemu-system-x86_64 is not installed; apt-get install qemu-system-x86"
    monkeypatch.setattr(preflight.cvm.os, "geteuid", lambda: 1000)
    assert refused().startswith("running the VM needs root")
