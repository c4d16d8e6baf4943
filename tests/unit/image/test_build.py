"""image build on a synthetic root tarball: the real sfdisk, mkfs.ext4 -d and debugfs, no mounts."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from coreslice.cli import main
from coreslice.image import build as buildmod
from coreslice.image import disk, rootfs

from .rootfs_fixture import REL, make_root

SRC = str(Path(__file__).resolve().parents[3] / "src")
pytestmark = pytest.mark.skipif(disk.e2fsprogs_version() is None or disk.e2fsprogs_version() < disk.MIN_E2FSPROGS,
                                reason="needs e2fsprogs >= 1.47.1 (scripts/install-system-deps.sh installs it)")


@pytest.fixture
def root_tar(tmp_path):
    return make_root(tmp_path / "root.tar")


def _debugfs(spec: str, cmd: str) -> str:
    return subprocess.run(["debugfs", "-R", cmd, spec], capture_output=True, text=True).stdout


def test_a_file_image_keeps_owners_modes_devices_and_xattrs(tmp_path, root_tar, capsys):
    img, out = tmp_path / "s.img", tmp_path / "s1"
    key = tmp_path / "k.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGt0lV0sQ9m1QK4GqJ8kVd3eD0bD3d6c1Sx7JvM8b5Jk t@x\n")
    cfg = tmp_path / "user.yaml"
    cfg.write_text("#cloud-config\nusers:\n  - name: slicer\n")
    rc = main(["image", "build", "--rootfs", str(root_tar), "--target", str(img), "--out-dir", str(out),
               "--cloud-config", str(cfg), "--ssh-key", str(key), "--network", "10.99.1.2/24,10.99.1.1",
               "--json", "--quiet"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["ok"], res
    im = res["image"]
    assert im["kernel_release"] == REL and im["label"] == "cloudimg-rootfs"
    assert im["cmdline"] == "root=LABEL=cloudimg-rootfs ro"
    assert Path(im["vmlinuz"]).read_bytes() == b"KERNEL" * 100
    assert Path(im["initrd"]).read_bytes() == b"INITRD" * 100
    # The GPT: one x86-64 root partition at 1 MiB.
    pt = json.loads(subprocess.run(["sfdisk", "-J", str(img)], capture_output=True, text=True).stdout)["partitiontable"]
    assert pt["label"] == "gpt" and len(pt["partitions"]) == 1
    part = pt["partitions"][0]
    assert part["type"] == disk.GPT_ROOT_X86_64 and part["start"] * 512 == im["partition"]["partition_start"]
    spec = f"{img}?offset={part['start'] * 512}"
    assert subprocess.run(["e2fsck", "-fn", spec], capture_output=True).returncode == 0
    assert "Filesystem volume name:   cloudimg-rootfs" in _debugfs(spec, "stats")
    st = _debugfs(spec, "stat /home/u/suid")
    assert "Mode:  04755" in st and "User:  1000   Group:  1000" in st
    assert "security.capability" in _debugfs(spec, "ea_list /home/u/suid")
    assert "character special" in _debugfs(spec, "stat /dev/null")
    assert "Fast link dest: \"boot/vmlinuz-" in _debugfs(spec, "stat /vmlinuz")
    assert disk.read_file(spec, "etc/fstab").decode().endswith("LABEL=cloudimg-rootfs / ext4 defaults,errors=remount-ro 0 1\n")
    ud = disk.read_file(spec, "var/lib/cloud/seed/nocloud/user-data").decode()
    assert ud.startswith("#cloud-config") and "slicer" in ud and "ssh-ed25519 AAAAC3" in ud
    assert "10.99.1.2/24" in disk.read_file(spec, "var/lib/cloud/seed/nocloud/network-config").decode()
    assert "local-hostname: s1" in disk.read_file(spec, "var/lib/cloud/seed/nocloud/meta-data").decode()
    assert "Mode:  0600" in _debugfs(spec, "stat /var/lib/cloud/seed/nocloud/user-data")
    assert json.loads((out / "image.json").read_text())["kernel_release"] == REL


@pytest.fixture
def nobody_dir():
    """A directory the unprivileged user 65534 owns, outside pytest's root-only tmp tree."""
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="coreslice-nobody-"))
    d.chmod(0o755)
    os.chown(d, 65534, 65534)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_built_by_a_user_without_root(nobody_dir, root_tar):
    """No mount, loop device or chown: an unprivileged user builds the same image."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root to switch to an unprivileged user")
    import yaml
    work = nobody_dir
    shutil.copy(root_tar, work / "root.tar")
    (work / "root.tar").chmod(0o644)
    # The user reads only what it is given: the tree and the venv may sit in a root-only folder
    # (a clone under mktemp -d), so the package and PyYAML are copied next to the work.
    lib = work / "lib"
    shutil.copytree(Path(SRC) / "coreslice", lib / "coreslice")
    shutil.copytree(Path(yaml.__file__).parent, lib / "yaml")
    os.system(f"chmod -R a+rX {lib}")
    env = {**os.environ, "PYTHONPATH": str(lib), "HOME": str(work), "CORESLICE_CACHE": str(work / "cache")}
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           os.path.realpath(sys.executable), "-m",
                           "coreslice", "image", "build", "--rootfs", str(work / "root.tar"), "--target",
                           str(work / "s.img"), "--out-dir", str(work / "out"), "--json", "--quiet"],
                          capture_output=True, text=True, env=env, cwd=work)
    assert proc.returncode == 0, proc.stderr
    spec = f"{work / 's.img'}?offset={1 << 20}"
    assert "User:  1000   Group:  1000" in _debugfs(spec, "stat /home/u/suid")
    assert (work / "s.img").stat().st_uid == 65534


@pytest.mark.parametrize("case", ["truncated", "no kernel", "no nvme", "small size", "exists", "bad config",
                                  "private key", "wrong sha256", "label", "no source", "url without sha",
                                  "directory target", "eval tools"])
def test_bad_input_writes_nothing(case, tmp_path, root_tar, capsys):
    img, out = tmp_path / "s.img", tmp_path / "out"
    src = root_tar
    args: list[str] = []
    if case == "truncated":
        data = root_tar.read_bytes()
        src = tmp_path / "cut.tar"
        src.write_bytes(data[:len(data) // 2])
    elif case == "no kernel":
        src = make_root(tmp_path / "nok.tar", kernel=False)
    elif case == "no nvme":
        src = make_root(tmp_path / "non.tar", nvme=False)
    elif case == "small size":
        args = ["--size", "8M"]
    elif case == "exists":
        img.write_bytes(b"precious")
    elif case == "bad config":
        cfg = tmp_path / "c.yaml"
        cfg.write_text("users: [\n")
        args = ["--cloud-config", str(cfg)]
    elif case == "private key":
        k = tmp_path / "id"
        k.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n")
        args = ["--ssh-key", str(k)]
    elif case == "wrong sha256":
        args = ["--sha256", "0" * 64]
    elif case == "label":
        args = ["--label", "a-label-far-too-long-for-ext4"]
    elif case == "directory target":
        img = tmp_path / "adir"
        img.mkdir()
    elif case == "eval tools":
        args = ["--eval-tools"]  # packages go into a --debian root only
    argv = ["image", "build", "--target", str(img), "--out-dir", str(out), "--json", "--quiet", *args]
    if case == "no source":
        pass
    elif case == "url without sha":
        argv += ["--rootfs", "http://127.0.0.1:9/root.tar"]
    else:
        argv += ["--rootfs", str(src)]
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc == 2, cap
    assert cap.err.count("\n") == 1 and cap.err.startswith("coreslice: error: "), cap.err
    assert json.loads(cap.out)["ok"] is False
    if case == "truncated":
        assert "truncated or damaged" in cap.err, cap.err
    if case == "eval tools":
        assert "--eval-tools" in cap.err and "--debian" in cap.err, cap.err
    if case == "exists":
        assert img.read_bytes() == b"precious"
    elif case != "directory target":
        assert not img.exists()
    assert not (out / "image.json").exists() and not (out / "vmlinuz").exists()


def test_a_failure_while_writing_removes_the_target(tmp_path, root_tar, monkeypatch, capsys):
    def broken(*a, **kw):
        raise disk.DiskError("the new file system does not check clean (e2fsck -fn exited 4): simulated")
    monkeypatch.setattr(disk, "check_fs", broken)
    img, out = tmp_path / "s.img", tmp_path / "out"
    rc = main(["image", "build", "--rootfs", str(root_tar), "--target", str(img), "--out-dir", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and f"removed {img}" in err
    assert not img.exists() and not (out / "image.json").exists()


def test_compressed_tarballs_are_read(tmp_path, capsys):
    src = make_root(tmp_path / "root.tar.xz", compress="xz")
    rc = main(["image", "build", "--rootfs", str(src), "--target", str(tmp_path / "s.img"),
               "--out-dir", str(tmp_path / "o"), "--json", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["image"]["rootfs"]["entries"] > 10


def test_boot_image_fills_kernel_initrd_and_root(tmp_path, root_tar, capsys):
    from coreslice.cli.boot import image_boot_files
    out = tmp_path / "o"
    assert main(["image", "build", "--rootfs", str(root_tar), "--target", str(tmp_path / "s.img"),
                 "--out-dir", str(out), "--quiet"]) == 0
    k, i, cmd = image_boot_files(str(out), None, None, "quiet")
    assert (k.name, i.name, cmd) == ("vmlinuz", "initrd.img", "root=LABEL=cloudimg-rootfs ro quiet")
    _, _, cmd = image_boot_files(str(out), None, None, "root=/dev/nvme0n1p1")
    assert cmd == "ro root=/dev/nvme0n1p1"
    from coreslice.errors import UsageError
    with pytest.raises(UsageError, match="brings its own kernel"):
        image_boot_files(str(out), Path("/k"), None, "")
    (out / "image.json").unlink()
    with pytest.raises(UsageError, match="does not exist"):
        image_boot_files(str(out), None, None, "")


def test_layout_and_sfdisk_script():
    lay = disk.plan_layout(64 << 20)
    assert (lay.start, lay.size) == (1 << 20, 62 << 20)
    assert "start=2048, size=126976" in disk.sfdisk_script(lay)
    lay4k = disk.plan_layout(64 << 20, 4096)
    assert "sector-size: 4096" in disk.sfdisk_script(lay4k) and "start=256," in disk.sfdisk_script(lay4k)


def test_eval_tools_add_the_workloads_packages():
    import argparse

    from coreslice.cli import image as image_cli
    from coreslice.evaluation.workloads import EVAL_PACKAGES
    args = argparse.Namespace(packages=["curl"], eval_tools=True, debian="bookworm")
    assert image_cli._packages(args) == ("curl", *EVAL_PACKAGES)
    assert image_cli._packages(argparse.Namespace(packages=[], eval_tools=False, debian="bookworm")) == ()


def test_mmdebstrap_command_line(tmp_path):
    deb = tmp_path / "linux-image-6.12.0_1_amd64.deb"
    argv = rootfs.mmdebstrap_argv("bookworm", ("curl",), (deb,), ["deb http://m/debian bookworm main"], tmp_path / "o.tar")
    assert argv[0] == "mmdebstrap" and "--format=tar" in argv
    assert f"--include={deb.resolve()}" in argv
    inc = next(a for a in argv if a.startswith("--include=systemd"))
    assert "cloud-init" in inc and "openssh-server" in inc and "curl" in inc and "linux-image-amd64" not in inc
    assert argv[-2:] == [str(tmp_path / "o.tar"), "deb http://m/debian bookworm main"]
    plain = rootfs.mmdebstrap_argv("bookworm", (), (), [], tmp_path / "o.tar")
    assert "linux-image-amd64" in next(a for a in plain if a.startswith("--include=systemd"))


def test_sources_come_from_this_machines_apt(tmp_path):
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://a/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
        "Signed-By: /k.gpg\n\nTypes: deb\nURIs: http://a/debian-security\nSuites: bookworm-security\n"
        "Components: main\nSigned-By: /k.gpg\n")
    (etc / "sources.list").write_text("deb [arch=amd64] http://b/debian bookworm main\n")
    lines = rootfs.host_sources("trixie", etc)
    assert "deb [signed-by=/k.gpg] http://a/debian trixie main" in lines
    assert "deb [signed-by=/k.gpg] http://b/debian trixie-updates main" in lines
    assert "deb [signed-by=/k.gpg] http://a/debian-security trixie-security main" in lines
    assert rootfs.host_sources("trixie", tmp_path / "none") == []


def _busybox_root(path: Path) -> Path:
    """A root whose /bin/sh is busybox and whose dpkg / update-initramfs are scripts that record
    how they were called, so the chroot step runs for real without a Debian tree."""
    bb = shutil.which("busybox")
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("./", "./bin", "./usr", "./usr/bin", "./usr/sbin", "./etc", "./tmp", "./proc", "./sys", "./dev", "./boot",
                  "./lib", "./lib/modules", "./lib/modules/" + REL, "./var", "./var/log", "./home", "./home/u"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o1777 if d == "./tmp" else 0o755
            tar.addfile(ti)
        tar.add(bb, "./bin/busybox")
        for name, body in (("dpkg", 'echo "dpkg $*" >>/var/log/calls; echo "$1" >/boot/marker'),
                           ("apt-get", 'echo "apt-get $*" >>/var/log/calls'),
                           ("update-initramfs", 'echo "update-initramfs $*" >>/var/log/calls; : >/boot/initrd.img-$3')):
            data = f"#!/bin/busybox sh\n{body}\n".encode()
            ti = tarfile.TarInfo(f"./usr/{'sbin' if name == 'update-initramfs' else 'bin'}/{name}")
            ti.size, ti.mode = len(data), 0o755
            tar.addfile(ti, io.BytesIO(data))
        for link in ("sh", "mount", "echo"):
            ti = tarfile.TarInfo(f"./bin/{link}")
            ti.type, ti.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(ti)
        ti = tarfile.TarInfo("./home/u/owned")
        ti.uid = ti.gid = 1000
        tar.addfile(ti, io.BytesIO(b""))
    return path


def test_kernel_debs_into_a_tarball_root_run_in_a_chroot_and_leave_no_mounts(tmp_path):
    if os.geteuid() != 0 or not shutil.which("busybox") or not shutil.which("unshare"):
        pytest.skip("needs root, busybox and unshare")
    src = _busybox_root(tmp_path / "bb.tar")
    deb = tmp_path / "linux-image-test_1_amd64.deb"
    deb.write_bytes(b"!<arch>\n")
    out = tmp_path / "out.tar"
    before = Path("/proc/self/mountinfo").read_text().count("\n")
    rootfs.install_debs_into_tarball(src, [deb], out, lambda m: None)
    assert Path("/proc/self/mountinfo").read_text().count("\n") == before  # nothing left mounted
    with tarfile.open(out) as tar:
        calls = tar.extractfile("./var/log/calls").read().decode()
        assert tar.extractfile("./boot/marker").read() == b"-i\n", (calls, tar.getnames())
        assert f"./boot/initrd.img-{REL}" in tar.getnames()
        assert not any(n.startswith("./tmp/coreslice-debs") for n in tar.getnames())
        assert tar.getmember("./home/u/owned").uid == 1000  # owners kept through extract + repack
    assert calls.splitlines() == [f"dpkg -i /tmp/coreslice-debs/{deb.name}", f"update-initramfs -c -k {REL}"], calls
    assert not any(p.name.startswith(".coreslice-chroot-") for p in tmp_path.iterdir())


def test_kernel_debs_into_a_tarball_need_root(tmp_path, monkeypatch):
    from coreslice.errors import UsageError
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(UsageError, match="needs root"):
        rootfs.install_debs_into_tarball(tmp_path / "r.tar", [tmp_path / "k.deb"], tmp_path / "o.tar", lambda m: None)


def test_a_failed_mmdebstrap_names_its_first_error_and_leaves_no_tarball(tmp_path, monkeypatch):
    """The cause (dpkg's error) is far above mmdebstrap's own last lines: the message carries it."""
    fake = tmp_path / "bin" / "mmdebstrap"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'I: extracting archives...'\necho \"dpkg: error: cannot stat pathname 'x.deb'\"\n"
                    "for i in 1 2 3 4 5 6; do echo noise $i; done\necho 'E: mmdebstrap failed to run'\nexit 25\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    seen = []
    out = tmp_path / "root.tar"
    with pytest.raises(rootfs.RootfsError) as e:
        rootfs.build_debian("bookworm", (), (), [], out, seen.append)
    assert "dpkg: error: cannot stat pathname" in str(e.value) and "mmdebstrap failed to run" in str(e.value)
    assert seen == ["mmdebstrap: extracting archives..."]
    assert list(tmp_path.glob("root.tar*")) == []


def _mounted_block_device() -> Path | None:
    """A block device node of this machine holding a mounted file system (read-only use)."""
    mounted = {line.split()[2] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    for dev in sorted(Path("/dev").iterdir()):
        try:
            st = dev.stat()
        except OSError:
            continue
        import stat as st_mod
        if st_mod.S_ISBLK(st.st_mode) and f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" in mounted:
            return dev
    return None


def test_a_mounted_block_device_is_refused_as_a_target(tmp_path):
    """Against this machine's own mounted disk: only stat and mountinfo are read, nothing opened
    for writing (the check comes first)."""
    dev = _mounted_block_device()
    if dev is None:
        pytest.skip("no mounted block device on this machine (a container without one)")
    from coreslice.errors import UsageError
    with pytest.raises(UsageError, match="is mounted; unmount it first"):
        disk.check_target(dev, None, 1 << 20)
    with pytest.raises(UsageError, match="drop --size"):
        disk.check_target(dev, 1 << 30, 1 << 20)
