"""The slice report line: what the slice initramfs writes and how it is parsed."""

from coreslice.testbed import initramfs
from coreslice.testbed.report import find_report, parse_report


def test_parse_plain_line():
    r = parse_report("CORESLICE-REPORT cpus=2 mem_kib=1012345 apic_ids=1,2 "
                     "cmdline=console=uart,io,0x2f8,115200n8 noapic pci=off")
    assert r == {
        "cpus": 2,
        "mem_kib": 1012345,
        "apic_ids": [1, 2],
        "pci": [],
        "cmdline": "console=uart,io,0x2f8,115200n8 noapic pci=off",
        "kernel_code": None,
    }


def test_parse_with_printk_prefix_and_cr():
    r = parse_report("[    4.367326] CORESLICE-REPORT cpus=1 mem_kib=5 apic_ids=3 cmdline=a b\r\n")
    assert r["cpus"] == 1 and r["apic_ids"] == [3] and r["cmdline"] == "a b"


def test_parse_empty_apic_list_and_cmdline():
    r = parse_report("CORESLICE-REPORT cpus=0 mem_kib=0 apic_ids= cmdline=")
    assert r == {"cpus": 0, "mem_kib": 0, "apic_ids": [], "pci": [], "cmdline": "", "kernel_code": None}


def test_non_report_lines():
    assert parse_report("[ 1.0] Run /init as init process") is None
    assert parse_report("CORESLICE-REPORT cpus=x") is None


def test_find_report_in_log():
    log = "boot\n[ 1.0] something\n[ 2.0] CORESLICE-REPORT cpus=3 mem_kib=9 apic_ids=1,2,3 cmdline=x\n"
    assert find_report(log)["cpus"] == 3
    assert find_report("nothing here\n") is None


def test_slice_init_writes_exact_format_to_kmsg():
    text = initramfs.slice_init_text()
    assert text.startswith("#!/bin/sh\n")
    assert ('line="CORESLICE-REPORT cpus=$cpus mem_kib=$mem apic_ids=$apic pci=$pci kcode=$kcode cmdline=$cmdline"'
            in text)
    assert 'echo "<2>$line" >/dev/kmsg' in text
    assert "while true; do sleep 3600; done" in text
    # A line of the shape the script prints parses back.
    sample = "CORESLICE-REPORT cpus=4 mem_kib=2000 apic_ids=0,1,2,3 cmdline=quiet"
    assert parse_report(sample)["apic_ids"] == [0, 1, 2, 3]
    r = parse_report("CORESLICE-REPORT cpus=1 mem_kib=2 apic_ids=1 pci= kcode=5a200000 cmdline=quiet")
    assert r["kernel_code"] == 0x5A200000 and r["cmdline"] == "quiet"
    assert parse_report("CORESLICE-REPORT cpus=1 mem_kib=2 apic_ids=1 pci= kcode=- cmdline=x")["kernel_code"] is None


def test_host_init_mounts_and_markers():
    text = initramfs.host_init_text()
    assert "insmod" in text and "netfs 9pnet 9pnet_virtio 9p msr" in text
    assert ("mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=1048576,cache=loose "
            "hostroot /newroot") in text
    assert "trans=virtio,version=9p2000.L,msize=1048576,cache=none run /mnt/run" in text
    assert 'chroot /newroot /bin/sh "$RUN_DIR/job.sh"' in text
    # Shares of their own (hostview.py), each at its path, created on the tmpfs if need be,
    # before the run share is bound (which may sit inside one of them).
    loop = text.index("done </mnt/run/mounts")
    assert 'mkdir -p "/newroot$path"' in text
    assert ('mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=1048576,cache=loose "$tag" '
            '"/newroot$path"') in text
    assert text.index("mount -t tmpfs tmpfs /newroot/tmp") < loop < text.index('mount -o bind /mnt/run')
    assert text.rstrip().endswith("poweroff -f")
    assert "CORESLICE-HOST" in text


def test_parse_pci_functions():
    r = parse_report("CORESLICE-REPORT cpus=2 mem_kib=1 apic_ids=2,3 pci=0000:20:00.0,0000:21:00.0 "
                     "cmdline=console=uart,io,0xe000,115200n8 pci=nobios")
    assert r["pci"] == ["0000:20:00.0", "0000:21:00.0"]
    assert r["cmdline"] == "console=uart,io,0xe000,115200n8 pci=nobios"


def test_first_trouble_finds_the_first_block_not_the_tail():
    from coreslice.testbed.report import first_trouble
    log = "\n".join(["[    0.1] ok"] * 10 + ["[    1.3] ------------[ cut here ]------------",
                                             "[    1.3] WARNING: at kernel/x.c:1", "[    1.3] Call Trace:"]
                    + ["[    2.0] later"] * 200)
    got = first_trouble(log)
    assert got.splitlines()[3].endswith("[ cut here ]------------") and "Call Trace:" in got
    assert len(got.splitlines()) == 63
    assert first_trouble("[ 0.1] all fine\n[ 0.2] Run /init as init process\n") == ""
