"""``coreslice image build``: one slice disk from a root tarball or Debian packages.

The order is what keeps a failure harmless:

1. check every input (label, tools, cloud-config, keys, network, kernel packages, target):
   nothing written yet;
2. get the root tarball (download with resume + sha256, or mmdebstrap) into the cache, and
   read it through once (complete? which kernel? NVMe driver?): still nothing written to the
   target;
3. check the target against the size the tree needs, then write the GPT, ``mkfs.ext4 -d``
   from the tarball, add fstab and the cloud-init seed, ``e2fsck -fn``;
4. copy the kernel and initrd out and write ``image.json`` last: an out-dir without it is not
   an image (``coreslice boot --image`` refuses it).

A failure in step 3 or 4 removes the target file (or wipes a device's partition table) and
what was copied out, so no half-built disk is ever taken for an image.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from coreslice.errors import CoresliceError, UsageError
from coreslice.image import cloudinit, disk, rootfs

MANIFEST = "image.json"
DEFAULT_LABEL = "cloudimg-rootfs"
IMAGES_DIR = Path("/var/lib/coreslice/images")
MIB = 1 << 20
Progress = Callable[[str], None]


def default_cache() -> Path:
    from coreslice.testbed.paths import cache_root  # the one cache location; created only when used
    return cache_root() / "images"


@dataclass
class BuildRequest:
    target: Path
    out_dir: Path
    size: int | None = None
    rootfs: str | None = None  # a tarball path or URL
    sha256: str | None = None
    debian: str | None = None  # a suite for mmdebstrap
    packages: tuple[str, ...] = ()
    kernel_debs: tuple[Path, ...] = ()
    label: str = DEFAULT_LABEL
    cloud_config: Path | None = None
    ssh_keys: tuple[Path, ...] = ()
    hostname: str | None = None
    instance_id: str | None = None
    network: str | None = None
    nic_mac: str | None = None
    force: bool = False
    cache: Path = field(default_factory=default_cache)
    apt_etc: Path = Path("/etc/apt")


@dataclass
class Checked:
    """Everything step 1 decided."""

    req: BuildRequest
    seed: cloudinit.Seed
    hostname: str
    net: cloudinit.NetSpec | None
    kernel_fields: list[dict[str, str]]


def _name_of(req: BuildRequest) -> str:
    return req.out_dir.name or "slice"


def check(req: BuildRequest, *, with_target: bool = True) -> Checked:
    """Step 1: every input, before anything is written or fetched (``with_target=False``: all
    but the target, which image install attaches only later)."""
    req.out_dir = Path(os.path.abspath(req.out_dir))
    if with_target:
        req.target = Path(os.path.abspath(req.target))
    disk.check_label(req.label)
    disk.check_tools()
    if (req.rootfs is None) == (req.debian is None):
        raise UsageError("give the root file system with exactly one of --rootfs FILE|URL and --debian SUITE")
    if req.rootfs is not None:
        if _is_url(req.rootfs):
            if req.sha256 is None:
                raise UsageError(f"--rootfs {req.rootfs} is a URL: give its --sha256 so that nothing unverified "
                                 "is written to the disk")
        else:
            _check_input_file(Path(req.rootfs), "--rootfs")
        if req.packages:
            raise UsageError("--packages needs --debian (a tarball's packages are already in it)")
    else:
        rootfs.check_suite(req.debian)  # type: ignore[arg-type]
        if req.sha256:
            raise UsageError("--sha256 checks a --rootfs tarball; --debian builds from signed packages")
    if req.sha256 is not None:
        from coreslice.image import download  # only with a checksum: keeps the common imports small
        download.check_sha256_arg(req.sha256)
    if req.kernel_debs and req.rootfs is not None and os.geteuid() != 0:
        raise UsageError("--kernel-deb with --rootfs installs packages in a chroot of the tarball, which needs "
                         "root; run as root, or build from --debian (no root needed)")
    fields = []
    for d in req.kernel_debs:
        _check_input_file(d, "--kernel-deb")
        fields.append(rootfs.check_kernel_deb(d))
    config = cloudinit.load_cloud_config(req.cloud_config) if req.cloud_config else None
    keys = [k for p in req.ssh_keys for k in [cloudinit.load_ssh_key(p)]]
    net = cloudinit.parse_network(req.network, req.nic_mac) if req.network else None
    hostname = req.hostname or (config or {}).get("hostname") or _name_of(req)
    seed = cloudinit.make_seed(hostname=hostname, instance_id=req.instance_id, cloud_config=config,
                               ssh_keys=keys, net=net)
    _check_out_dir(req.out_dir, req.force)
    if with_target:
        disk.check_target(req.target, req.size, 0, force=req.force)  # fail fast; sized again in step 3
    return Checked(req, seed, hostname, net, fields)


def _is_url(value: str) -> bool:
    return "://" in value


def _check_input_file(path: Path, what: str) -> None:
    from coreslice.plan.boot import input_file_size  # the loader's own check: opened, regular, readable
    input_file_size(path, what, what)


def _check_out_dir(d: Path, force: bool) -> None:
    if d.exists() and not d.is_dir():
        raise UsageError(f"--out-dir {d} is not a directory; give a new or empty directory")
    if d.is_dir() and (d / MANIFEST).exists() and not force:
        raise UsageError(f"--out-dir {d} already holds an image ({MANIFEST}); pass --force to replace it")
    parent = d if d.is_dir() else next((p for p in d.parents if p.exists()), Path("/"))
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--out-dir {d}: {parent} is not writable; give another directory")


def needed_bytes(info: rootfs.TarballInfo) -> int:
    """The disk a tree needs: data plus a block per member (inodes, small files, directories),
    inode tables, the journal and reserved blocks (~10%), and the GPT's 2 MiB."""
    data = info.bytes + info.members * 4096
    return -(-int(data * 1.15 + 128 * MIB) // MIB) * MIB + 2 * MIB


def default_size(need: int) -> int:
    """Room to run: the tree plus half again (at least 512 MiB more), in 64 MiB steps."""
    size = need + max(512 * MIB, need // 2)
    return -(-size // (64 * MIB)) * (64 * MIB)


def obtain_tarball(c: Checked, progress: Progress, times: dict) -> tuple[Path, dict]:
    """Step 2: the root tarball in the cache, and where it came from."""
    req, t = c.req, time.perf_counter()
    if req.rootfs is not None and not _is_url(req.rootfs):
        path = Path(req.rootfs)
        source = {"tarball": str(path.resolve())}
        if req.sha256:
            progress(f"checking the sha256 of {path}")
            from coreslice.image import download
            got = download.sha256_file(path)
            if got != req.sha256.lower():
                raise UsageError(f"--rootfs {path} has sha256 {got}, not {req.sha256.lower()}; get the file again "
                                 "or correct --sha256")
            source["sha256"] = got
        return _with_kernel_debs(c, path, source, progress, times)
    req.cache.mkdir(parents=True, exist_ok=True)
    if req.rootfs is not None:
        name = Path(req.rootfs.split("?", 1)[0]).name or "rootfs.tar"
        dest = req.cache / "downloads" / f"{req.sha256.lower()[:16]}-{name}"  # type: ignore[union-attr]
        dest.parent.mkdir(exist_ok=True)
        from coreslice.image import download
        path = download.fetch(req.rootfs, dest, req.sha256, progress)
        times["download"] = round(time.perf_counter() - t, 3)
        return _with_kernel_debs(c, path, {"url": req.rootfs, "sha256": req.sha256.lower(),  # type: ignore[union-attr]
                                           "tarball": str(path)}, progress, times)
    sources = rootfs.host_sources(req.debian, req.apt_etc)  # type: ignore[arg-type]
    key = rootfs.cache_key(req.debian, req.packages, req.kernel_debs, sources)  # type: ignore[arg-type]
    path = req.cache / "rootfs" / f"{req.debian}-{key}.tar"
    if path.is_file():
        progress(f"using the cached Debian root {path}")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        progress(f"building a Debian {req.debian} root with mmdebstrap (minutes; cached as {path})")
        rootfs.build_debian(req.debian, req.packages, req.kernel_debs, sources, path, progress)  # type: ignore[arg-type]
        times["mmdebstrap"] = round(time.perf_counter() - t, 3)
    return path, {"debian": req.debian, "packages": list(req.packages),
                  "kernel_debs": [str(d) for d in req.kernel_debs], "tarball": str(path), "cache_key": key}


def _with_kernel_debs(c: Checked, path: Path, source: dict, progress: Progress, times: dict) -> tuple[Path, dict]:
    """A tarball root with --kernel-deb: the packages installed in a chroot of it (the
    prototype's dpkg + apt --fix-broken), cached by the tarball's and the packages' contents."""
    req = c.req
    if not req.kernel_debs:
        return path, source
    t = time.perf_counter()
    from coreslice.image import download
    h = download.sha256_file(path)[:16] + "-" + rootfs.cache_key("tarball", (), req.kernel_debs, ())
    out = req.cache / "rootfs" / f"tarball-{h}.tar"
    if out.is_file():
        progress(f"using the cached root with the kernel packages {out}")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        rootfs.install_debs_into_tarball(path, req.kernel_debs, out, progress)
        times["kernel_debs"] = round(time.perf_counter() - t, 3)
    return out, {**source, "kernel_debs": [str(d) for d in req.kernel_debs], "tarball": str(out)}


def build(req: BuildRequest, progress: Progress = lambda m: None) -> dict:
    """Steps 1-4; the JSON-able result."""
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    c = check(req)
    times["check"] = round(time.perf_counter() - t0, 3)
    tarball, source = obtain_tarball(c, progress, times)
    t = time.perf_counter()
    progress(f"reading {tarball} through (complete? kernel? NVMe driver?)")
    info = rootfs.scan_tarball(tarball)
    times["scan"] = round(time.perf_counter() - t, 3)
    release = info.release()
    if not info.modules.get(release):
        raise UsageError(f"kernel {release} in {tarball} has no NVMe driver (nvme.ko or built in); its initramfs "
                         "cannot find a root on NVMe: use a kernel with CONFIG_BLK_DEV_NVME")
    if c.net is not None and c.net.mac is None and info.ifupdown:
        raise UsageError(f"{tarball} configures its network with ifupdown, whose cloud-init renderer cannot match "
                         "a NIC by name pattern; give the slice NIC's MAC with --nic-mac")
    if not info.init:
        raise UsageError(f"{tarball} has no /sbin/init or systemd; give a bootable root file system")
    need = needed_bytes(info)
    target = disk.check_target(req.target, req.size, need, force=req.force)
    if target.kind == "file" and req.size is None:
        target = disk.check_target(req.target, default_size(need), need, force=req.force)
    layout = disk.plan_layout(target.size, target.sector)
    if layout.size < need - 2 * MIB:
        raise UsageError(f"--target {req.target}: the partition would have {layout.size >> 20} MiB, the tree needs "
                         f"{need >> 20} MiB; give a larger target")
    req.out_dir.mkdir(parents=True, exist_ok=True)
    forget_image(req.out_dir)  # --force: an older image there must not outlive its disk
    written: list[Path] = []
    try:
        with tempfile.TemporaryDirectory(prefix="coreslice-image-") as scratch:
            t = time.perf_counter()
            progress(f"writing a GPT on {req.target} ({target.size >> 20} MiB, root partition "
                     f"{layout.size >> 20} MiB at {layout.start >> 20} MiB)")
            disk.write_partition_table(target, layout)
            progress(f"mkfs.ext4 -d {tarball.name} (label {req.label}, {info.members} entries, "
                     f"{info.bytes >> 20} MiB)")
            spec = disk.make_fs(target, layout, tarball, req.label)
            times["mkfs"] = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
            files = dict(cloudinit.seed_files(c.seed))
            files["etc/fstab"] = (f"# written by coreslice image build\nLABEL={req.label} / ext4 "
                                  "defaults,errors=remount-ro 0 1\n").encode(), 0o644
            progress(f"adding /etc/fstab and the cloud-init seed (hostname {c.hostname})")
            disk.add_files(spec, files, Path(scratch))
            progress("checking the file system (e2fsck -fn)")
            disk.check_fs(spec)
            times["finish"] = round(time.perf_counter() - t, 3)
            boot_files = rootfs.extract_boot_files(tarball, info, release, req.out_dir)
            written += boot_files.values()
        result = {
            "name": _name_of(req),
            "target": target.describe(),
            "partition": {**layout.describe(), "number": 1, "fs": "ext4", "label": req.label},
            "label": req.label,
            "kernel_release": release,
            "vmlinuz": str(boot_files["vmlinuz"]),
            "initrd": str(boot_files["initrd"]),
            "cmdline": f"root=LABEL={req.label} ro",
            "rootfs": {**source, "bytes": info.bytes, "entries": info.members, "cloud_init": info.cloud_init,
                       "sshd": info.sshd},
            "seed": {"hostname": c.hostname, "instance_id": _meta(c.seed, "instance-id"),
                     "network": c.net.mode if c.net else None,
                     "address": c.net.address if c.net else None,  # native-setup gives the host the same
                     "ssh_keys": len(req.ssh_keys)},
            "image_bytes": target.size,
            "built_at": time.time(),
        }
        times["total"] = round(time.perf_counter() - t0, 3)
        result["times"] = times
        tmp = req.out_dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, req.out_dir / MANIFEST)  # last: marks the out-dir an image
        progress(f"image ready: {req.target} ({target.size >> 20} MiB), kernel {release}, "
                 f"boot with: coreslice boot --image {req.out_dir}")
        return result
    except BaseException as e:
        undone = [disk.discard(target)]
        for p in written:
            p.unlink(missing_ok=True)
        if isinstance(e, CoresliceError):
            raise type(e)(f"{e}; {', '.join(undone)}") from e
        if isinstance(e, OSError):  # disk full, a directory vanished ...: one line, not a traceback
            raise disk.DiskError(f"{e.strerror or e} ({e.filename or req.out_dir}) while writing the image; "
                                 f"{', '.join(undone)}; free space or fix the path, then build again") from e
        raise


def forget_image(out_dir: Path) -> list[str]:
    """Remove image.json and the boot files of ``out_dir`` (what ``boot --image`` would take)."""
    gone = []
    for name in (MANIFEST, "vmlinuz", "initrd.img"):
        try:
            (out_dir / name).unlink()
            gone.append(f"removed {out_dir / name}")
        except FileNotFoundError:
            pass
    return gone


def _meta(seed: cloudinit.Seed, key: str) -> str | None:
    for line in seed.meta_data.decode().splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip().strip("'\"")
    return None


# -- reading an image back (coreslice boot --image) -----------------------------------------

def load_manifest(ref: str, images_dir: Path = IMAGES_DIR) -> dict:
    """``--image NAME|DIR``: a directory holding image.json, or a name under the images
    directory; the kernel and initrd it names must exist."""
    d = Path(ref)
    if not (d.is_dir() or "/" in ref):
        d = images_dir / ref
    path = d / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--image {ref}: {path} does not exist; build one with coreslice image build "
                         "--out-dir DIR, or give --kernel/--initrd") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--image {ref}: cannot read {path} ({e}); rebuild the image") from None
    for k in ("vmlinuz", "initrd"):
        if not isinstance(data.get(k), str) or not Path(data[k]).is_file():
            raise UsageError(f"--image {ref}: its {k} {data.get(k)!r} is missing; rebuild the image")
    if not isinstance(data.get("cmdline"), str):
        raise UsageError(f"--image {ref}: {path} has no cmdline; rebuild the image")
    return data
