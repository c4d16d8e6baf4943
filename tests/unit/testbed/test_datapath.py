"""The slices' data path (testbed/datapath.py): devices on each slice's root bus, QEMU and
`coreslice boot` arguments, job-script lines, report parsing, images."""

import dataclasses
import subprocess
from pathlib import Path

import pytest

from coreslice.errors import UsageError
from coreslice.testbed import datapath, initramfs, report
from coreslice.testbed.job import complete_slice_args, render_job_script
from coreslice.testbed.qemu import slice_serial_ports

RUN = Path("/cache/runs/r1")
PORTS = slice_serial_ports(RUN)
PXB = {p.name: p for p in PORTS}


def test_link_addresses_follow_the_root_bus():
    ln = datapath.link_for_port(PXB["pxb2"], True, True, RUN)
    assert ln.k == 2 and ln.port.root_bus == "0000:40"
    assert ln.nvme_address == "0000:42:00.0" and ln.nic_address == "0000:43:00.0"
    assert ln.host_nic_address == "0000:00:1a.0"
    assert dataclasses.replace(ln, storage=False).nic_address == "0000:42:00.0"  # buses numbered in order
    assert (ln.slice_ip, ln.host_ip) == ("10.99.2.2", "10.99.2.1")
    assert ln.devices == ["0000:42:00.0", "0000:43:00.0"]
    assert ln.cmdline == "coreslice.storage=1 coreslice.net=10.99.2.2/24,10.99.2.1"
    assert ln.image == RUN / "disk-pxb2.img"


def test_storage_or_network_alone():
    s = datapath.link_for_port(PXB["pxb1"], True, False, RUN)
    assert s.devices == ["0000:22:00.0"] and s.cmdline == "coreslice.storage=1"
    n = datapath.link_for_port(PXB["pxb1"], False, True, RUN)
    assert n.devices == ["0000:22:00.0"] and n.image is None  # buses numbered in root-port order
    assert n.cmdline == "coreslice.net=10.99.1.2/24,10.99.1.1"


@pytest.mark.parametrize("name", ["com2", "pci"])
def test_console_not_on_a_pxb_root_bus_is_refused(name):
    with pytest.raises(UsageError, match="pxb root bus"):
        datapath.link_for_port(PXB[name], True, True, RUN)
    with pytest.raises(UsageError, match="pxb root bus"):
        datapath.link_for_port(None, True, True, RUN)


def test_machine_args_put_devices_behind_root_ports_of_the_pxb():
    ln = datapath.link_for_port(PXB["pxb1"], True, True, RUN)
    args = datapath.machine_args([ln], RUN)
    devs = [args[i + 1] for i, a in enumerate(args) if a == "-device"]
    assert "pcie-root-port,id=pxb1rp1,bus=pxb1,chassis=0x20,slot=1,addr=0x1" in devs
    assert "nvme,drive=pxb1disk,serial=cs-pxb1,bus=pxb1rp1,addr=0x0" in devs
    assert "pcie-root-port,id=pxb1rp2,bus=pxb1,chassis=0x20,slot=2,addr=0x2" in devs
    assert "e1000e,netdev=pxb1net,mac=52:54:00:99:01:02,bus=pxb1rp2,addr=0x0" in devs
    # The host's end of link 1, on the same QEMU hub.
    assert "e1000e,netdev=pxb1hostnet,mac=52:54:00:99:01:01,bus=pcie.0,addr=0x19" in devs
    nets = [args[i + 1] for i, a in enumerate(args) if a == "-netdev"]
    assert "hubport,id=pxb1net,hubid=1" in nets and "hubport,id=pxb1hostnet,hubid=1" in nets
    # The host's own disk and NIC; user networking that cannot leave the machine.
    assert "user,id=hostnet,restrict=on" in nets
    assert any(d.startswith("nvme,drive=hostdisk,") and "addr=0x17" in d for d in devs)
    drives = [args[i + 1] for i, a in enumerate(args) if a == "-drive"]
    assert f"if=none,id=pxb1disk,format=raw,file={RUN}/disk-pxb1.img" in drives
    assert f"if=none,id=hostdisk,format=raw,file={RUN}/disk-host.img" in drives


def test_slice_args_add_devices_and_merge_cmdline():
    ln = datapath.link_for_port(PXB["pxb1"], True, True, RUN)
    out = datapath.slice_args(("--cpus", "1", "--cmdline", "quiet", "--console", "0000:21:00.0"), ln)
    assert out[:2] == ("--cpus", "1")
    assert "quiet" not in out[:out.index("--console")]
    assert [out[i + 1] for i, a in enumerate(out) if a == "--device"] == ["0000:22:00.0", "0000:23:00.0"]
    assert out[-2:] == ("--cmdline", "quiet coreslice.storage=1 coreslice.net=10.99.1.2/24,10.99.1.1")
    out = datapath.slice_args(("--cpus", "1", "--cmdline=a b"), ln)
    assert out.count("--cmdline") == 1 and out[-1].startswith("a b coreslice.storage=1")


def test_completed_jobs_get_their_own_root_bus():
    jobs = complete_slice_args(["--cpus 1", "--cpus 2"], Path("/k"), Path("/i"), PORTS, default_kind="pxb")
    links = [datapath.link_for_port(j.port, True, True, RUN) for j in jobs]
    assert [ln.port.root_bus for ln in links] == ["0000:20", "0000:40"]


def test_job_script_sets_up_host_links_before_slices_and_checks_after():
    jobs = complete_slice_args(["--cpus 1"], Path("/k"), Path("/i"), PORTS, default_kind="pxb")
    ln = datapath.link_for_port(jobs[0].port, True, True, RUN)
    text = render_job_script(RUN, "/usr/bin/python3", "/src", jobs, [],
                             setup_lines=datapath.host_setup_lines([ln]),
                             check_lines=datapath.host_check_lines([ln]))
    setup = text.index("ip addr add 10.99.1.1/24")
    assert text.index("event python-ready") < setup < text.index("event boot-start 0")
    assert "/sys/bus/pci/devices/0000:00:19.0/net/" in text
    check = text.index("busybox ping -c 3 -w 15 10.99.1.2")
    assert text.index('"$RUN/continue"') < check < text.index("event job-end")
    assert "blkid -c /dev/null -L cs-host" in text
    # Without the data path the script is unchanged.
    plain = render_job_script(RUN, "/usr/bin/python3", "/src", jobs, [])
    assert "ip addr" not in plain and "ping" not in plain


def test_ping_rtt_busybox_and_iputils():
    assert datapath.ping_rtt("round-trip min/avg/max = 0.402/1.250/2.1 ms") == 1.25
    assert datapath.ping_rtt("rtt min/avg/max/mdev = 0.1/0.2/0.3/0.05 ms") == 0.2
    assert datapath.ping_rtt("3 packets transmitted, 0 received, 100% packet loss") is None


def test_report_with_data_fields_parses_and_stays_compatible():
    line = ("[ 8.2] CORESLICE-REPORT cpus=1 mem_kib=474496 apic_ids=1 pci=0000:20:00.0,0000:22:00.0 "
            "storage_read=coreslice-disk-pxb1-ok storage_written=1 ping_ok=1 rtt_ms=11.571 "
            "cmdline=noapic coreslice.storage=1")
    r = report.parse_report(line)
    assert r["storage"] == {"read": "coreslice-disk-pxb1-ok", "written": True}
    assert r["network"] == {"ping_ok": True, "rtt_ms": 11.571}
    assert r["cmdline"] == "noapic coreslice.storage=1" and r["pci"][-1] == "0000:22:00.0"
    r = report.parse_report("CORESLICE-REPORT cpus=1 mem_kib=5 apic_ids=1 pci= "
                               "storage_read=- storage_written=0 ping_ok=0 rtt_ms=- cmdline=x")
    assert r["storage"] == {"read": None, "written": False}
    assert r["network"] == {"ping_ok": False, "rtt_ms": None}
    r = report.parse_report("CORESLICE-REPORT cpus=1 mem_kib=5 apic_ids=1 ping_ok=1 rtt_ms=2 cmdline=x")
    assert "storage" not in r and r["network"]["rtt_ms"] == 2.0
    assert "storage" not in report.parse_report("CORESLICE-REPORT cpus=1 mem_kib=5 apic_ids=1 cmdline=x")


def test_slice_init_with_data_loads_modules_and_reports_before_cmdline():
    text = initramfs.slice_init_text(("nvme-core", "nvme", "ext4"))
    assert 'for m in nvme-core nvme ext4; do insmod "/lib/modules/$m.ko"' in text
    assert "pci=$pci kcode=$kcode$extra cmdline=$cmdline" in text
    assert "mount -t ext4 /dev/nvme0n1 /mnt/disk" in text and "/mnt/disk/hello.txt" in text
    assert "umount /mnt/disk" in text and "/mnt/disk/result.txt" in text
    assert 'extra="$extra storage_read=$sread storage_written=$swritten"' in text
    assert 'extra="$extra ping_ok=$ping_ok rtt_ms=$rtt"' in text
    assert "$extra" not in initramfs.slice_init_text() and "insmod" not in initramfs.slice_init_text()


def test_mkfs_command_has_no_journal_and_populates_from_dir():
    cmd = datapath.mkfs_command(Path("/r/d.img"), Path("/r/d.img.d"), "cs-pxb1", 16)
    assert cmd == ["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-L", "cs-pxb1", "-d", "/r/d.img.d",
                   "/r/d.img", "16M"]


def test_build_and_read_image(tmp_path):
    # e2fsprogs is a required test dependency (scripts/install-system-deps.sh): fail, never skip.
    img = datapath.build_image(tmp_path / "d.img", "cs-t", {"hello.txt": "known\n"}, size_mb=4)
    assert img.stat().st_size == 4 << 20
    assert datapath.read_image_file(img, "hello.txt") == "known\n"
    assert datapath.read_image_file(img, "result.txt") is None
    label = subprocess.run(["e2label", str(img)], capture_output=True, text=True).stdout.strip()
    assert label == "cs-t"


def test_slice_result_checks_the_image(tmp_path, monkeypatch):
    ln = datapath.link_for_port(PXB["pxb1"], True, True, tmp_path)
    monkeypatch.setattr(datapath, "read_image_file",
                        lambda img, name: "coreslice-result read=coreslice-disk-pxb1-ok\n")
    rep = {"storage": {"read": "coreslice-disk-pxb1-ok", "written": True},
           "network": {"ping_ok": True, "rtt_ms": 1.5}}
    out = datapath.slice_result(ln, rep)
    assert out["storage"]["read"] == out["storage"]["expected"] == "coreslice-disk-pxb1-ok"
    assert out["storage"]["written"] is True
    assert out["network"] == {"ping_ok": True, "rtt_ms": 1.5, "address": "10.99.1.2", "peer": "10.99.1.1"}
    monkeypatch.setattr(datapath, "read_image_file", lambda img, name: None)
    out = datapath.slice_result(ln, None)
    assert out["storage"]["written"] is False and out["network"]["ping_ok"] is False


def test_cli_flags_default_off():
    import argparse

    from coreslice.cli import testbed as cli

    p = argparse.ArgumentParser()
    cli.add_run_arguments(p)
    a = p.parse_args(["--storage", "--network"])
    assert a.storage and a.network
    a = p.parse_args([])
    assert not a.storage and not a.network
