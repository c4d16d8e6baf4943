"""Host facts a launch depends on and the emulated machine never shows: kernel lockdown, a host
kernel that does not reserve the low 1 MiB, Linux's rule for MADT entries, an AMD host's TSC."""

from __future__ import annotations

import json
import struct

import pytest

from coreslice import cli
from coreslice.acpi.tables import checksum
from coreslice.host import readiness
from coreslice.host.snapshot import discover

from ..hosttree import make_host_tree


def _boot(capsys, root, tmp_path):
    rc = cli.main(["boot", "--kernel", str(KERNEL[0]), "--cpus", "1", "--memory", "256M@0x40000000",
                   "--console", "io:0x2f8", "--host-root", str(root), "--ledger", str(tmp_path / "l"),
                   "--dry-run", str(tmp_path / f"d{len(list(tmp_path.iterdir()))}")])
    return rc, capsys.readouterr().err


KERNEL = []


@pytest.fixture(autouse=True)
def _kernel(debian_kernel):
    KERNEL[:] = [debian_kernel.vmlinuz]


@pytest.mark.parametrize("mode, refused", [("integrity", True), ("confidentiality", True), ("none", False)])
def test_lockdown(capsys, tmp_path, mode, refused):
    root = make_host_tree(tmp_path / "host")
    (root / "sys/kernel/security").mkdir(parents=True)
    (root / "sys/kernel/security/lockdown").write_text(
        " ".join(f"[{m}]" if m == mode else m for m in ("none", "integrity", "confidentiality")) + "\n")
    rc, err = _boot(capsys, root, tmp_path)
    assert (rc == 2) == refused, err
    if refused:
        assert f"locked down ({mode}" in err and err.count("\n") == 1
    item = next(i for i in readiness.check(root).items if i.name == "kernel")
    assert (item.status == "fail") == refused and (mode in item.detail or refused)


@pytest.mark.parametrize("release, cmdline, refused", [
    ("5.10.0-28-amd64", "maxcpus=1 mem=1G", True),
    ("5.10.0-28-amd64", "maxcpus=1 mem=1G reservelow=640K", False),
    ("5.10.0-28-amd64", "maxcpus=1 mem=1G reservelow=64K", True),
    ("5.13.0", "maxcpus=1 mem=1G", False),
])
def test_old_host_kernels_must_reserve_low_memory(capsys, tmp_path, release, cmdline, refused):
    root = make_host_tree(tmp_path / "host", cmdline=cmdline)
    (root / "proc/sys/kernel/osrelease").write_text(release + "\n")
    rc, err = _boot(capsys, root, tmp_path)
    assert (rc == 2) == refused, err
    if refused:
        assert "does not reserve all memory below 1 MiB" in err and "reservelow=640K" in err


def _madt(entries):
    body = struct.pack("<II", 0xFEE00000, 1)
    for kind, uid, apic in entries:
        body += (struct.pack("<BBBBI", 0, 8, uid, apic, 1) if kind == "lapic"
                 else struct.pack("<BBHIII", 9, 16, 0, apic, 1, uid))
    hdr = struct.pack("<4sIBB6s8sI4sI", b"APIC", 36 + len(body), 5, 0, b"OEMID ", b"MIXED   ", 1, b"TEST", 1)
    raw = bytearray(hdr + body)
    raw[9] = (-checksum(raw)) & 0xFF
    return bytes(raw)


def test_cpu_numbers_follow_linux_rules_for_mixed_madt_entries(tmp_path):
    """Local APIC entries for 0-3, then firmware's x2APIC duplicates of 2 and 3 (ignored: below
    0xFF with Local APIC entries present) and a real x2APIC CPU 300: CPU 4 is APIC ID 300."""
    root = make_host_tree(tmp_path / "host", ncpus=5, apic_mode="x2apic")
    (root / "sys/firmware/acpi/tables/APIC").write_bytes(_madt(
        [("lapic", 0, 0), ("lapic", 1, 1), ("lapic", 2, 2), ("lapic", 3, 3),
         ("x2apic", 10, 2), ("x2apic", 11, 3), ("x2apic", 12, 300)]))
    cpus = discover(root).cpus
    assert [c.apic_id for c in cpus] == [0, 1, 2, 3, 300]


def test_amd_host_tsc_from_its_kernel_log(tmp_path):
    """AMD CPUs report no TSC frequency in CPUID (no leaf 0x15), so the slice gets it on its
    command line (tsc_early_khz) from the host's own calibration, which an AMD host logs too."""
    root = make_host_tree(tmp_path / "host", tsc=False, kmsg_extra=(
        "tsc: Fast TSC calibration using PIT", "tsc: Detected 2994.374 MHz processor"))
    assert discover(root).tsc_khz == 2994374
