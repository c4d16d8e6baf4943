"""Discovery reads a host tree into plain records."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from coreslice.acpi.tables import build_madt
from coreslice.errors import UsageError
from coreslice.host import cpus, memory, platform
from coreslice.host.snapshot import discover
from coreslice.host.sysfs import MAX_CPU, format_cpu_list, parse_cpu_list

from ..hosttree import BOOT_ID, make_host_tree


def test_cpu_lists_round_trip():
    assert parse_cpu_list("0-3,5,7-8\n") == [0, 1, 2, 3, 5, 7, 8]
    assert format_cpu_list([8, 7, 5, 0, 1, 2, 3]) == "0-3,5,7-8"


def test_synthetic_host(tmp_path):
    h = discover(make_host_tree(tmp_path))
    assert [(c.cpu, c.apic_id, c.online, c.boot) for c in h.cpus] == [
        (0, 0, True, True), (1, 1, False, False), (2, 2, False, False), (3, 3, False, False)]
    assert h.boot_id == BOOT_ID
    assert h.tsc_khz == 2496012  # the refined calibration wins over the first estimate
    assert h.apic_mode == "xapic" and h.apic_mode_source == "IA32_APIC_BASE MSR"
    assert [(r.start, r.end) for r in h.host_ram()] == [(0x1000, 0x9FC00), (0x100000, 0x40000000)]
    assert h.firmware_ram()[-1] == memory.Range(0x100000000, 0x280000000, "System RAM")
    ports = {p.port: p for p in h.serial_ports}
    assert ports[0x3F8].in_use_as_console and not ports[0x2F8].in_use_as_console
    assert ports[0x0].type == 0
    assert h.mcfg[0].base_address == 0xB0000000


def test_x2apic_mode_from_msr(tmp_path):
    assert discover(make_host_tree(tmp_path, apic_mode="x2apic")).apic_mode == "x2apic"


def test_apic_ids_through_firmware_node_uid(tmp_path):
    """Non-contiguous APIC IDs (as on multi-socket servers): the UID link decides, not order."""
    root = make_host_tree(tmp_path)
    (root / "sys/firmware/acpi/tables/APIC").write_bytes(build_madt([0x10, 0x20, 0x30], host_bsp_apic_id=0))
    (root / "proc/cpuinfo").write_text("processor\t: 0\napicid\t\t: 0\n")
    # build_madt lists the host BSP first (uid 0xfffffffe), then uids 0, 1, 2 for 0x10, 0x20, 0x30.
    for n, uid in ((1, 2), (2, 0), (3, 1)):
        node = root / f"sys/devices/system/cpu/cpu{n}/firmware_node"
        node.mkdir(parents=True)
        (node / "uid").write_text(f"{uid}\n")
    h = discover(root)
    assert {c.cpu: c.apic_id for c in h.cpus} == {0: 0, 1: 0x30, 2: 0x10, 3: 0x20}


def test_kmsg_records_and_tsc():
    lines = ["tsc: Detected 2995.200 MHz processor", "something else"]
    assert platform.tsc_khz_from_log(lines) == 2995200
    assert platform.tsc_khz_from_log(["nothing"]) is None


def test_apic_mode_from_log():
    assert platform.apic_mode_from_log(["APIC: Switched APIC routing to: physical x2apic"]) == "x2apic"
    assert platform.apic_mode_from_log(["APIC: Switched APIC routing to: physical flat"]) == "xapic"


def test_iomem_top_level_only():
    rs = memory.parse_iomem("00001000-0009fbff : System RAM\n  00002000-00002fff : child\n")
    assert rs == [memory.Range(0x1000, 0x9FC00, "System RAM")]


def test_cpuinfo_apic_ids():
    text = "processor\t: 0\napicid\t\t: 4\n\nprocessor\t: 1\napicid\t\t: 6\n"
    assert cpus.parse_cpuinfo_apic_ids(text) == {0: 4, 1: 6}


@pytest.mark.parametrize("text, match", [
    ("0-", "'0-' is not a CPU number or a range N-M"),
    ("a", "'a' is not a CPU number"),
    ("1,,2", "'' is not a CPU number"),
    ("-1", "'-1' is not a CPU number"),
    ("²", "'²' is not a CPU number"),  # int() takes some non-ASCII digits; the kernel writes none
    ("3-1", "range '3-1' runs backwards"),
    ("1-100000000000000000000", r"CPU 1000\d+\.\.\. is above 65535 \(Linux on x86 runs at most 8192"),
    ("1-4000000000", r"CPU 4000000000 is above 65535"),
    ("9" * 5000, "is above 65535"),  # not int()'s digit limit
])
def test_cpu_lists_are_bounded_and_strict(text, match):
    with pytest.raises(ValueError, match=match):
        parse_cpu_list(text)


def test_cpu_lists_up_to_the_bound_are_accepted():
    assert parse_cpu_list("") == [] and parse_cpu_list(" 1, 3-4 ") == [1, 3, 4]
    assert parse_cpu_list(f"0-{MAX_CPU}") == list(range(MAX_CPU + 1)) and MAX_CPU == 65535


@pytest.mark.parametrize("rel, content, problem", [
    ("sys/devices/system/cpu/present", "0-\n", "not a CPU list ('0-' is not"),
    ("sys/devices/system/cpu/online", "0-4000000000\n", "not a CPU list (CPU 4000000000 is above 65535"),
    ("proc/cpuinfo", "processor\t: zero\n", "a processor or apicid line is not a number"),
    ("sys/firmware/memmap/3/start", "zz\n", "not a memory address ('zz' is not a hexadecimal number)"),
    ("proc/iomem", "00001000-zz : System RAM\n", "not a memory address ('zz'"),
    ("proc/iomem", "00002000-00001000 : System RAM\n", "not a memory range (0x2000-0x1000)"),
    ("sys/class/tty/ttyS1/port", "port two\n", "not a number ('port two' is not a hexadecimal number)"),
    ("sys/firmware/acpi/tables/APIC", b"APIC\xff\xff\xff\xff", "APIC header at offset 0x0 is truncated"),
    ("sys/firmware/acpi/tables/MCFG", b"XXXX" + bytes(40), "expected a MCFG table"),
    ("proc/cmdline", b"\xff\xfe", "is not UTF-8 text"),
    ("proc/mounts", None, "is not a regular file"),  # a FIFO: reading it would block
    ("proc/cmdline", "dir", "is not a regular file"),
    ("dev/kmsg", "dir", "is neither the kernel log device nor a file of its text"),
])
def test_junk_in_a_host_tree_is_one_line_naming_the_file(tmp_path, rel, content, problem):
    import os
    import shutil

    tree = make_host_tree(tmp_path / "host")
    path = tree / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        os.unlink(path)
    if content is None:
        os.mkfifo(path)
    elif content == "dir":
        path.mkdir()
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UsageError) as e:
        discover(tree)
    msg = str(e.value)
    assert msg.startswith(f"{tree / rel}: ") and problem in msg, msg
    assert msg.endswith("; repair that file or capture the host tree again (scripts/capture-host.sh)")
    shutil.rmtree(tree)


@pytest.mark.parametrize("make", ["missing", "file"])
def test_a_host_root_that_is_no_directory_is_refused(tmp_path, make):
    root = tmp_path / "tree"
    if make == "file":
        root.write_text("")
    with pytest.raises(UsageError, match=f"^host root {root}: (no such|not a) directory; pass a captured host tree"):
        discover(root)


Q35 = Path(__file__).resolve().parents[2] / "fixtures/hosts/qemu-q35"
VDA1 = "devices/pci0000:00/0000:00:02.0/virtio1/block/vda/vda1"  # a virtio-blk disk on 00:02.0


@pytest.mark.parametrize("how", ["mountinfo", "root=/dev/vda1", "root=253:1", "root=fd01", "root=PARTUUID",
                                 "st_dev of /"])
def test_dev_root_is_traced_to_its_controller(tmp_path, how, debian_kernel, capsys):
    """A root file system mounted by the kernel itself (no initramfs) is "/dev/root" in
    /proc/mounts: its controller must still count as the host's storage."""
    import os
    import shutil

    from coreslice import cli
    from coreslice.host import storage

    tree = tmp_path / "q35"
    shutil.copytree(Q35, tree, symlinks=True)
    (tree / "sys" / VDA1).mkdir(parents=True)
    (tree / "sys/class/block").mkdir(parents=True)
    (tree / "sys/class/block/vda1").symlink_to(f"../../{VDA1}")
    (tree / "proc/mounts").write_text("/dev/root / ext4 rw,relatime 0 0\nproc /proc proc rw 0 0\n")
    dev = "253:1"
    if how == "st_dev of /":
        st = os.stat(tree).st_dev
        dev = f"{os.major(st)}:{os.minor(st)}"
    (tree / "sys/dev/block").mkdir(parents=True)
    (tree / "sys/dev/block" / dev).symlink_to(f"../../{VDA1}")
    cmdline = (tree / "proc/cmdline").read_text().strip()
    if how == "mountinfo":
        (tree / "proc/self").mkdir()
        (tree / "proc/self/mountinfo").write_text(f"22 1 {dev} / / rw,relatime shared:1 - ext4 /dev/root rw\n")
    elif how == "root=PARTUUID":
        (tree / "dev/disk/by-partuuid").mkdir(parents=True)
        (tree / "dev/disk/by-partuuid/0f5c6a2e-01").symlink_to("../../vda1")
        (tree / "proc/cmdline").write_text(f"{cmdline} root=PARTUUID=0f5c6a2e-01\n")
    elif how.startswith("root="):
        (tree / "proc/cmdline").write_text(f"{cmdline} {how}\n")
    live = how == "st_dev of /"  # the fallback a live host has: the st_dev of its /
    assert storage.host_storage_functions(tree, live=live) == {"0000:00:02.0": ["/"]}
    if live:
        return
    rc = cli.main(["boot", "--kernel", str(debian_kernel.vmlinuz), "--cpus", "1", "--memory", "256M@0x40000000",
                   "--console", "io:0x2f8", "--device", "0000:00:02.0", "--host-root", str(tree),
                   "--dry-run", str(tmp_path / "out"), "--ledger", str(tmp_path / "ledger.sqlite3")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert "device 0000:00:02.0 holds the host's own storage (mounted: /)" in err


def test_an_msr_that_is_a_fifo_does_not_block_discovery(tmp_path):
    import os
    import threading

    tree = make_host_tree(tmp_path / "host", kmsg_extra=("x2apic enabled",))
    msr = tree / "dev/cpu/0/msr"
    msr.unlink()
    os.mkfifo(msr)
    unblocked = []

    def unblock():  # a regression blocks in open(): a writer that comes and goes makes it fail instead
        unblocked.append(True)
        os.close(os.open(msr, os.O_WRONLY | os.O_NONBLOCK))
    timer = threading.Timer(5, unblock)
    timer.start()
    try:
        h = discover(tree)
    finally:
        timer.cancel()
    assert not unblocked and (h.apic_mode, h.apic_mode_source) == ("x2apic", "kernel log")


def test_a_pci_device_link_that_loops_is_no_traceback(tmp_path):
    import os
    import shutil

    tree = tmp_path / "q35"
    shutil.copytree(Q35, tree, symlinks=True)
    link = tree / "sys/bus/pci/devices/0000:00:10.0"
    link.unlink()
    os.symlink("0000:00:10.0", link)  # Path.resolve raised RuntimeError("Symlink loop")
    with pytest.raises(UsageError, match=r"devices/0000:00:10\.0/class: cannot open it \(Too many levels"):
        discover(tree)
