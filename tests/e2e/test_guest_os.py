"""End to end (issue 10 section 5): a slice boots Debian from its own NVMe and is reached over SSH.

`coreslice testbed run --guest-os debian --network` builds the slice's disk with `coreslice image
build` (Debian bookworm from packages with systemd, cloud-init and openssh-server, the testbed's
6.12 kernel installed inside; the mmdebstrap root is cached by its inputs, the disk is built per
run from it with the test's cloud-config), puts it on a whole NVMe controller on the slice's own
root bus, and boots it with `coreslice boot --image`.  The slice's initramfs finds
root=LABEL=cloudimg-rootfs on NVMe, systemd starts, cloud-init sets the hostname and user from the
seed, and the emulated host logs in over the slice's NIC with the test's key.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from coreslice.testbed.run import RunOptions, run

pytestmark = pytest.mark.e2e


def test_slice_boots_debian_from_its_nvme_and_answers_ssh(testbed_ready, tmp_path):
    from coreslice.testbed.paths import cache_dir
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "e2e", "-f", str(key)], check=True)
    cfg = tmp_path / "user-data.yaml"
    cfg.write_text("#cloud-config\n" + json.dumps({
        "hostname": "guest-one",
        "users": [{"name": "tester", "shell": "/bin/bash",
                   "ssh_authorized_keys": [(tmp_path / "id_ed25519.pub").read_text().strip()]}],
    }) + "\n")
    work = cache_dir() / "test-runs" / f"guest-os-{time.strftime('%H%M%S')}-{os.getpid()}"
    result = run(RunOptions(slices=["--cpus 1-2 --memory 2G@0x100000000"], guest_os="debian", network=True,
                            guest_cloud_config=cfg, guest_ssh_key=key, workdir=work,
                            slice_timeout=420, timeout=900))
    s = result["slices"][0]
    log = s["console_log"]
    assert result["host"].get("error") is None, result["host"]
    assert s["exit_code"] == 0, s["stderr"]
    assert "root=LABEL=cloudimg-rootfs" in s["output"]["plan"]["cmdline"]  # from the image's image.json
    o = s["os"]
    assert o["ssh_ok"], f"no SSH login ({o['ssh_error']}); console: {log}"
    assert o["hostname"] == "guest-one", log  # set by cloud-init from the test's seed
    assert o["user"] == "tester"
    assert o["nproc"] == 2
    assert o["root_source"] == "/dev/nvme0n1p1", log  # its root is its own NVMe disk
    assert o["cloud_init"] == "done", log
    assert 0 < o["seconds_to_ssh"] < 420
    # The host's own disk and NIC still work, and it reaches the slice at its address.
    data = result["host"]["data"]
    assert data["disk"]["ok"] and data["network"]["ping_ok"]
    assert data["network"]["slices"]["10.99.1.2"]["ok"]
    assert result["guest_os_ok"] and result["ok"]
    assert not (work / "guest-1.img").exists()  # the large disk is not kept


def test_an_image_built_with_image_build_boots_through_an_overlay(testbed_ready, tmp_path):
    """--guest-os DIR: the disk `coreslice image build` wrote, as a user would build it (the
    image's default user gets --ssh-key), booted through a qcow2 overlay: the image file itself
    is not changed."""
    from coreslice.cli import main
    from coreslice.testbed import guestos
    from coreslice.testbed.paths import cache_dir
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "e2e", "-f", str(key)], check=True)
    where = cache_dir() / "test-runs" / f"guest-dir-{time.strftime('%H%M%S')}-{os.getpid()}"
    where.mkdir(parents=True)  # the emulated host sees the cache, not this test's /tmp
    img, out = where / "disk.img", where / "image"
    try:
        # The same Debian root as the testbed's (same inputs: cached), seeded for link 1.
        assert main(["image", "build", "--debian", guestos.SUITE, "--kernel-deb",
                     str(guestos.kernel_deb(testbed_ready[0])), "--target", str(img), "--out-dir", str(out),
                     "--ssh-key", f"{key}.pub", "--network", "10.99.1.2/24,10.99.1.1",
                     "--nic-mac", "52:54:00:99:01:02", "--hostname", "dirguest", "--quiet"]) == 0
        before = (img.stat().st_mtime_ns, img.stat().st_size)
        result = run(RunOptions(slices=["--cpus 1-2 --memory 2G@0x100000000"], guest_os=str(out), network=True,
                                guest_ssh_key=key, workdir=where / "run", slice_timeout=420, timeout=900))
        o = result["slices"][0]["os"]
        log = result["slices"][0]["console_log"]
        assert o["ssh_ok"], f"no SSH login ({o['ssh_error']}); console: {log}"
        assert (o["hostname"], o["user"], o["root_source"], o["cloud_init"]) == \
            ("dirguest", "debian", "/dev/nvme0n1p1", "done"), log
        assert o["disk"]["format"] == "qcow2"
        assert result["ok"]
        assert (img.stat().st_mtime_ns, img.stat().st_size) == before  # written only through the overlay
    finally:
        img.unlink(missing_ok=True)
