"""`coreslice host configure`: the reference configurations as a GRUB drop-in, on a tmp root
with a fake update-grub on PATH."""

import json
import os
import subprocess

import pytest

from coreslice import cli
from coreslice.host import profiles as hostcfg
from coreslice.acpi.tables import build_madt
from coreslice.errors import UsageError

from ..hosttree import make_host_tree

GRUB = 'GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT="quiet splash"\nGRUB_CMDLINE_LINUX=""\n'


@pytest.fixture
def root(tmp_path):
    r = make_host_tree(tmp_path / "root")
    (r / "etc/default").mkdir(parents=True)
    (r / "etc/default/grub").write_text(GRUB)
    return r


@pytest.fixture
def fake_update_grub(tmp_path, monkeypatch):
    """An update-grub on PATH that records each call (and fails when told to)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "update-grub.calls"
    exe = bindir / "update-grub"
    exe.write_text(f'#!/bin/sh\necho called >>{calls}\necho "Generating grub configuration file ..." >&2\n'
                   'exit ${FAKE_UPDATE_GRUB_RC:-0}\n')
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    return calls


def _main(capsys, *argv):
    rc = cli.main(["host", "configure", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _cmdline_after_sourcing(root):
    """What update-grub would see: /etc/default/grub, then the drop-in, sourced by sh."""
    script = f'. {root}/etc/default/grub; . {root / hostcfg.DROPIN}; printf %s "$GRUB_CMDLINE_LINUX_DEFAULT"'
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout


def test_slice_host_written_and_update_grub_run(root, fake_update_grub, capsys):
    rc, out, err = _main(capsys, "--profile", "slice-host", "--root", str(root))
    assert rc == 0
    assert _cmdline_after_sourcing(root) == ("quiet splash memory_corruption_check=0 pci=assign-busses "
                                             "maxcpus=1 mem=6G intremap=off intel_iommu=off")
    assert (root / "etc/default/grub").read_text() == GRUB  # never edited
    assert fake_update_grub.read_text() == "called\n"
    assert "reboot" in out and str(root / hostcfg.DROPIN) in out
    assert oct((root / hostcfg.DROPIN).stat().st_mode & 0o777) == "0o644"
    # Every parameter is explained in the file.
    text = (root / hostcfg.DROPIN).read_text()
    for p in ("memory_corruption_check=0", "pci=assign-busses", "maxcpus=1", "mem=6G", "intremap=off",
              "intel_iommu=off"):
        assert f"#   {p} " in text


def test_profiles_and_sizes(root, fake_update_grub, capsys):
    assert _main(capsys, "--profile", "vm-host", "--root", str(root))[0] == 0
    assert _cmdline_after_sourcing(root) == ("quiet splash memory_corruption_check=0 pci=assign-busses "
                                            "intel_iommu=on iommu=pt")
    assert _main(capsys, "--profile", "native-eval", "--root", str(root))[0] == 0
    assert _cmdline_after_sourcing(root).endswith("maxcpus=8 mem=16G intremap=off intel_iommu=off")
    assert _main(capsys, "--profile", "slice-host", "--host-cpus", "2", "--host-mem", "2048m",
                 "--root", str(root))[0] == 0
    assert "maxcpus=2 mem=2G " in _cmdline_after_sourcing(root)
    assert fake_update_grub.read_text().count("called") == 3  # rewritten, never appended twice


def test_dry_run_prints_and_changes_nothing(root, fake_update_grub, capsys):
    rc, out, _ = _main(capsys, "--profile", "slice-host", "--dry-run", "--root", str(root))
    assert rc == 0
    assert "dry run" in out and 'GRUB_CMDLINE_LINUX_DEFAULT="${GRUB_CMDLINE_LINUX_DEFAULT} ' in out
    assert not (root / hostcfg.DROPIN).exists() and not fake_update_grub.exists()
    rc, out, _ = _main(capsys, "--profile", "vm-host", "--dry-run", "--json", "--root", str(root))
    r = json.loads(out)
    assert r["parameters"] == ["memory_corruption_check=0", "pci=assign-busses", "intel_iommu=on", "iommu=pt"]
    assert r["written"] is False and r["reboot_needed"] is False


def test_dry_run_works_without_grub(tmp_path, capsys):
    r = make_host_tree(tmp_path)
    assert _main(capsys, "--profile", "slice-host", "--dry-run", "--root", str(r))[0] == 0


def test_no_grub_is_a_usage_error(tmp_path, fake_update_grub, capsys):
    rc, _, err = _main(capsys, "--profile", "slice-host", "--root", str(make_host_tree(tmp_path)))
    assert rc == 2 and "does not boot through GRUB" in err and err.count("\n") == 1


def test_update_grub_missing_says_how_to_fix(root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    rc, _, err = _main(capsys, "--profile", "slice-host", "--root", str(root))
    assert rc == 1 and "update-grub not found: install grub2-common" in err and err.count("\n") == 1
    assert (root / hostcfg.DROPIN).is_file()


def test_update_grub_failure(root, fake_update_grub, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_UPDATE_GRUB_RC", "3")
    rc, _, err = _main(capsys, "--profile", "slice-host", "--root", str(root))
    assert rc == 1 and "update-grub exited with 3" in err


@pytest.mark.parametrize("argv, message", [
    (["--profile", "vm-host", "--host-cpus", "1"], "whole machine"),
    (["--profile", "slice-host", "--host-cpus", "4"], "leaves no CPU for slices"),
    (["--profile", "slice-host", "--host-cpus", "0"], "at least 1 CPU"),
    (["--profile", "slice-host", "--host-mem", "10G"], "leaves no RAM for slices"),
    (["--profile", "slice-host", "--host-mem", "100M"], "at least 256M"),
    (["--profile", "slice-host", "--host-mem", "lots"], "not a size"),
])
def test_bad_input_exits_2_and_writes_nothing(root, fake_update_grub, capsys, argv, message):
    rc, _, err = _main(capsys, *argv, "--root", str(root))
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not (root / hostcfg.DROPIN).exists() and not fake_update_grub.exists()


def test_iommu_on_confines_slices_dma_with_remapping_off(root, fake_update_grub, capsys):
    rc, out, _ = _main(capsys, "--profile", "slice-host", "--iommu", "on", "--dry-run", "--json", "--root", str(root))
    r = json.loads(out)
    assert rc == 0 and r["parameters"][-3:] == ["intremap=off", "intel_iommu=on",
                                                "vfio_iommu_type1.allow_unsafe_interrupts=1"]
    assert "intel_iommu=off" not in r["parameters"] and "iommu=pt" not in r["parameters"]
    for argv, message in ((["--profile", "vm-host", "--iommu", "on"], "only the slice-host profile"),
                          (["--profile", "slice-host", "--iommu", "on", "--intremap", "on"], "--intremap off")):
        rc, _, err = _main(capsys, *argv, "--root", str(root))
        assert rc == 2 and message in err and err.count("\n") == 1
    (root / "sys/firmware/acpi/tables/APIC").write_bytes(build_madt([0x100, 0x101, 0x102], host_bsp_apic_id=0))
    rc, _, err = _main(capsys, "--profile", "slice-host", "--iommu", "on", "--root", str(root))
    assert rc == 2 and "needs interrupt remapping off" in err
    assert not (root / hostcfg.DROPIN).exists() and not fake_update_grub.exists()


def test_native_eval_may_exceed_the_machine(root, fake_update_grub, capsys):
    # native-eval restricts the native system; it leaves nothing for slices by design.
    assert _main(capsys, "--profile", "native-eval", "--root", str(root))[0] == 0


def test_intremap_decision():
    assert hostcfg.decide_intremap("auto", [0, 1, 2], [])[0] is True
    keep, why = hostcfg.decide_intremap("auto", [0, 0x100], [])
    assert keep is False and "APIC ID 0x100 is above 254" in why
    assert hostcfg.decide_intremap("auto", [0, 1], ["x2apic: Cannot disable locked x2apic, id: 0"])[0] is False
    assert hostcfg.decide_intremap("on", [0, 1], [])[0] is False
    assert hostcfg.decide_intremap("off", [0, 1], [])[0] is True
    with pytest.raises(UsageError, match="use --intremap on"):
        hostcfg.decide_intremap("off", [0, 0x1FF], [])


def test_large_apic_ids_keep_interrupt_remapping(root, fake_update_grub, capsys):
    (root / "sys/firmware/acpi/tables/APIC").write_bytes(build_madt([0x100, 0x101, 0x102], host_bsp_apic_id=0))
    rc, out, _ = _main(capsys, "--profile", "slice-host", "--json", "--root", str(root))
    r = json.loads(out)
    assert rc == 0 and "intremap=off" not in r["parameters"] and "intel_iommu=off" in r["parameters"]
    assert any("must run x2APIC" in n for n in r["notes"])
    assert "# note: no intremap=off" in r["content"]
    rc, _, err = _main(capsys, "--profile", "slice-host", "--intremap", "off", "--root", str(root))
    assert rc == 2 and "--intremap off" in err


def test_conflicting_grub_settings_are_noted(root, fake_update_grub, capsys):
    (root / "etc/default/grub.d").mkdir()
    (root / "etc/default/grub.d/50-cloudimg.cfg").write_text('GRUB_CMDLINE_LINUX_DEFAULT="maxcpus=4 quiet"\n')
    rc, out, _ = _main(capsys, "--profile", "slice-host", "--dry-run", "--json", "--root", str(root))
    assert any("50-cloudimg.cfg also sets maxcpus=4" in n for n in json.loads(out)["notes"])


def test_help_explains_intremap(capsys):
    with pytest.raises(SystemExit):
        cli.main(["host", "configure", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "x2APIC only with interrupt remapping" in out and "APIC IDs 0-254" in out
    assert "/etc/default/grub.d/coreslice.cfg" in out


@pytest.mark.parametrize("break_it, message", [
    (lambda r: (r / "etc/default/grub.d").write_text("not a directory\n"),
     "etc/default/grub.d is not a directory, so the drop-in {dropin} cannot be written; move"),
    (lambda r: (r / hostcfg.DROPIN).mkdir(parents=True),
     "{dropin} exists and is not a regular file; remove it"),
    (lambda r: os.mkfifo((r / "etc/default/grub.d").mkdir() or r / hostcfg.DROPIN),
     "{dropin} exists and is not a regular file; remove it"),
])
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_dropin_that_cannot_be_written_is_refused_first(root, fake_update_grub, capsys, break_it, message,
                                                          dry_run):
    break_it(root)
    before = sorted((p.relative_to(root), p.is_dir()) for p in (root / "etc").rglob("*"))
    rc, out, err = _main(capsys, "--profile", "slice-host", "--root", str(root), "--json",
                         *(["--dry-run"] if dry_run else []))
    assert rc == 2 and err.count("\n") == 1, err
    assert message.format(dropin=root / hostcfg.DROPIN) in err and json.loads(out)["exit_code"] == 2
    assert sorted((p.relative_to(root), p.is_dir()) for p in (root / "etc").rglob("*")) == before
    assert not fake_update_grub.exists()
