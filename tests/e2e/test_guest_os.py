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
