"""testbed/guestos.py: boot arguments, the host's SSH lines and the "os" result (pure parts)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from coreslice.errors import UsageError
from coreslice.testbed import guestos


def _guest(tmp_path, user="slicer", host="guest-one"):
    return guestos.Guest(1, tmp_path / "img", tmp_path / "g.img", "raw", user, host)


def test_slice_args_boot_the_image_instead_of_the_testbed_kernel(tmp_path):
    g = _guest(tmp_path)
    args = ("--cpus", "1-2", "--kernel", "/k", "--initrd=/i", "--console", "0000:21:00.0",
            "--cmdline", "coreslice.net=10.99.1.2/24,10.99.1.1")
    out = guestos.slice_args(args, g)
    assert "--kernel" not in out and not any(a.startswith("--initrd") for a in out)
    assert out[out.index("--image") + 1] == str(g.image_dir)
    assert out[out.index("--cmdline") + 1] == "coreslice.net=10.99.1.2/24,10.99.1.1 " + guestos.GUEST_CMDLINE
    assert guestos.slice_args(("--cpus", "1"), g)[-2:] == ("--cmdline", guestos.GUEST_CMDLINE)


def test_ssh_lines_are_valid_sh_and_retry_until_the_deadline(tmp_path):
    g = _guest(tmp_path)
    lines = guestos.host_check_lines([(0, g, "10.99.1.2")], tmp_path / "key", 300)
    script = "\n".join(['up() { echo 1.5; }', 'event() { :; }', *lines])
    assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0
    body = "\n".join(lines)
    assert "slicer@10.99.1.2" in body and "BatchMode=yes" in body and "cloud-init status --wait" in body
    assert "chmod 600 /tmp/guest-key" in body and ">os-0.txt" in body and "os-0.rc" in body


def test_result_from_what_the_host_saw(tmp_path):
    g = _guest(tmp_path)
    (tmp_path / "os-0.rc").write_text("0 40.0 95.5 12\n")
    (tmp_path / "os-0.txt").write_text("guest-one\n2\n/dev/nvme0n1p1\n....\nstatus: done\n")
    r = guestos.result(tmp_path, 0, g, 41.0)
    assert r == {**r, "hostname": "guest-one", "nproc": 2, "root_source": "/dev/nvme0n1p1",
                 "cloud_init": "done", "ssh_ok": True, "seconds_to_ssh": 54.5, "ssh_attempts": 12}


def test_result_when_ssh_never_worked(tmp_path):
    g = _guest(tmp_path)
    (tmp_path / "os-0.rc").write_text("1 40.0 400.0 80\n")
    (tmp_path / "os-0.err").write_text("ssh: connect to host 10.99.1.2 port 22: No route to host\n")
    r = guestos.result(tmp_path, 0, g, 41.0)
    assert r["ssh_ok"] is False and r["hostname"] is None and r["seconds_to_ssh"] is None
    assert "No route to host" in r["ssh_error"]
    assert guestos.result(tmp_path, 1, g, None)["ssh_ok"] is False  # nothing written at all


def test_choice_and_key_checks(tmp_path):
    with pytest.raises(UsageError, match="image.json"):
        guestos.check_choice(str(tmp_path))
    (tmp_path / "image.json").write_text("{}")
    with pytest.raises(UsageError, match="--guest-ssh-key"):
        guestos.check_choice(str(tmp_path))
    with pytest.raises(UsageError, match="one slice"):
        guestos.check_choice(str(tmp_path), tmp_path / "k", 2)
    assert guestos.check_choice(str(tmp_path), tmp_path / "k") == str(tmp_path)
    with pytest.raises(UsageError, match=r"\.pub"):
        guestos.ensure_keypair(tmp_path, tmp_path / "nokey")


def test_default_cloud_config_gives_the_key_to_a_sudo_user(tmp_path):
    key = tmp_path / "k"
    Path(str(key) + ".pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGt0lV0sQ9m1QK4GqJ8kVd3eD0bD3d6c1Sx7JvM8b5Jk t\n")
    cfg = guestos.default_cloud_config(tmp_path, key, 2)
    assert guestos.user_and_host(cfg) == ("slicer", "slice2")
