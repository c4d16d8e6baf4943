"""What real servers need that the emulated machine forgives (issue: the loader on real
servers): CPUs whose APIC ID an MSI cannot name, a host whose IOMMU blocks compatibility-format
MSIs, and a kernel that would move itself below the slice's memory."""

from __future__ import annotations

import json
import struct

import pytest

from coreslice import cli, machine
from coreslice.acpi.tables import checksum
from coreslice.machine.fake import FakeMachine

from ..hosttree import SRIOV_NIC, make_host_tree


def x2apic_madt(apic_ids):
    """A host MADT of x2APIC entries (ACPI 6.5 §5.2.12.12, type 9), as large servers have."""
    body = struct.pack("<II", 0xFEE00000, 0)
    for uid, apic in enumerate(apic_ids):
        body += struct.pack("<BBHIII", 9, 16, 0, apic, 1, uid)
    hdr = struct.pack("<4sIBB6s8sI4sI", b"APIC", 36 + len(body), 5, 0, b"OEMID ", b"BIGHOST ", 1, b"TEST", 1)
    raw = bytearray(hdr + body)
    raw[9] = (-checksum(raw)) & 0xFF
    return bytes(raw)


@pytest.fixture
def big_host(tmp_path):
    """CPU 1 has APIC ID 258 (a second socket's numbering on a large x2APIC server)."""
    root = make_host_tree(tmp_path / "host", apic_mode="x2apic")
    (root / "sys/firmware/acpi/tables/APIC").write_bytes(x2apic_madt([0, 258, 2, 3]))
    return root


def _boot(capsys, root, tmp_path, *extra, dry=True):
    argv = ["boot", "--kernel", str(KERNEL[0]), "--memory", "256M@0x40000000", "--console", "io:0x2f8",
            "--host-root", str(root), "--ledger", str(tmp_path / "ledger"), "--json", *extra]
    if dry:
        argv += ["--dry-run", str(tmp_path / f"dry{len(list(tmp_path.iterdir()))}")]
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, json.loads(out) if out.strip() else None, err


KERNEL = []


@pytest.fixture(autouse=True)
def _kernel(debian_kernel):
    KERNEL[:] = [debian_kernel.vmlinuz]


def test_a_device_is_refused_on_a_cpu_whose_apic_id_an_msi_cannot_name(capsys, big_host, tmp_path):
    rc, doc, err = _boot(capsys, big_host, tmp_path, "--cpus", "1", "--device", SRIOV_NIC)
    assert rc == 2 and "CPUs 1 (APIC ID 258) have APIC IDs above 255" in err
    assert "reach APIC ID 2, another CPU" in err and err.count("\n") == 1
    # Without devices the slice may have that CPU (x2APIC wakes it); with polled devices too.
    assert _boot(capsys, big_host, tmp_path, "--cpus", "1")[0] == 0
    assert _boot(capsys, big_host, tmp_path, "--cpus", "1", "--device", SRIOV_NIC, "--devices-polled")[0] == 0


def test_placement_prefers_apic_ids_below_256_for_slices_with_devices(capsys, big_host, tmp_path):
    rc, doc, err = _boot(capsys, big_host, tmp_path, "--ncpus", "1", "--device", SRIOV_NIC)
    assert rc == 0, err
    assert doc["placement"]["cpus"] == [2] and doc["placement"]["apic_ids"] == [2]
    rc, doc, err = _boot(capsys, big_host, tmp_path, "--ncpus", "1")
    assert rc == 0 and doc["placement"]["cpus"] == [1]  # no devices: the lowest CPU, APIC ID 258


def test_a_host_with_interrupt_remapping_blocks_device_interrupts(capsys, tmp_path):
    root = make_host_tree(tmp_path / "host", apic_mode="x2apic",
                          kmsg_extra=("DMAR-IR: Enabled IRQ remapping in x2apic mode",))
    rc, doc, err = _boot(capsys, root, tmp_path, "--cpus", "1", "--device", SRIOV_NIC)
    assert rc == 2 and "the host runs interrupt remapping" in err and "intremap=off" in err
    assert _boot(capsys, root, tmp_path, "--cpus", "1")[0] == 0  # no device: nothing to interrupt
    assert _boot(capsys, root, tmp_path, "--cpus", "1", "--device", SRIOV_NIC, "--devices-polled")[0] == 0


def test_memory_below_the_kernels_preferred_address_is_refused(capsys, tmp_path):
    root = make_host_tree(tmp_path / "host")
    (root / "proc/iomem").write_text("00000000-00000fff : Reserved\n00001000-0009fbff : System RAM\n"
                                     "00100000-007fffff : System RAM\n")
    rc, doc, err = _boot(capsys, root, tmp_path, "--cpus", "1", "--memory", "128M@0x800000")
    assert rc == 2 and "below its preferred load address 0x1000000" in err, err
    assert _boot(capsys, root, tmp_path, "--cpus", "1", "--memory", "128M@0x1000000")[0] == 0


def test_refusals_touch_nothing(capsys, big_host, tmp_path):
    with machine.using(FakeMachine()) as m:
        rc, _, _ = _boot(capsys, big_host, tmp_path, "--cpus", "1", "--device", SRIOV_NIC, dry=False)
    assert rc == 2 and m.effects() == [] and not (tmp_path / "ledger").exists()


def test_memory_above_2_to_the_46_is_refused(capsys, tmp_path):
    """no5lvl: 4-level paging reaches 64 TiB of physical memory; firmware RAM above that (a
    large NVDIMM or CXL host) cannot be a slice's."""
    root = make_host_tree(tmp_path / "host")
    mm = root / "sys/firmware/memmap/9"
    mm.mkdir(parents=True)
    (mm / "start").write_text(f"0x{(1 << 46) - (1 << 30):x}\n")
    (mm / "end").write_text(f"0x{(1 << 46) + (1 << 30) - 1:x}\n")
    (mm / "type").write_text("System RAM\n")
    rc, _, err = _boot(capsys, root, tmp_path, "--cpus", "1", "--memory", f"512M@0x{(1 << 46) - (1 << 28):x}")
    assert rc == 2 and "ends above 64 TiB" in err, err
    rc, _, err = _boot(capsys, root, tmp_path, "--cpus", "1", "--memory", f"512M@0x{(1 << 46) - (1 << 30):x}")
    assert rc == 0, err


def test_a_slice_with_devices_all_above_4g_is_warned_of_swiotlb(capsys, tmp_path):
    root = make_host_tree(tmp_path / "host")
    rc, doc, err = _boot(capsys, root, tmp_path, "--cpus", "1", "--memory", "512M@0x100000000", "--device", SRIOV_NIC)
    assert rc == 0, err
    assert any("no swiotlb" in w for w in doc["plan"]["warnings"])
    rc, doc, err = _boot(capsys, root, tmp_path, "--cpus", "1", "--memory", "512M@0x40000000", "--device", SRIOV_NIC)
    assert rc == 0 and doc["plan"]["warnings"] == []
