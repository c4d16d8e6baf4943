"""Root file systems for slice images: a tarball, checked and read once, or one built from
Debian packages with mmdebstrap.

A tarball (Debian or Ubuntu cloud root tarballs, or mmdebstrap's output) is read through once
with ``tarfile`` before anything is written: that pass proves it is complete (a truncated
tarball ends in a read error here, not in a half-filled disk), sizes it, and finds the kernel
(``boot/vmlinuz-R`` + ``boot/initrd.img-R``), its modules (``lib/modules/R`` or, merged-/usr,
``usr/lib/modules/R``) and whether the NVMe driver is among them (a root on NVMe needs it in
the initramfs), and whether systemd and cloud-init are there.

mmdebstrap is Debian's tool for building a root from packages with apt; its tarball output is
what ``mkfs.ext4 -d`` reads (disk.py).  The image's apt sources are derived from this
machine's own Debian sources (the same archive URIs), never written into the project.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from coreslice.errors import CoresliceError, UsageError

# What every --debian image gets besides the packages asked for: an init, device manager and
# module tools, the initramfs generator for the kernel, and cloud-init with SSH (the image is
# configured by its NoCloud seed and reached over SSH).
BASE_PACKAGES = ("systemd-sysv", "udev", "kmod", "initramfs-tools", "e2fsprogs", "iproute2", "ifupdown",
                 "isc-dhcp-client", "netbase", "openssh-server", "cloud-init", "sudo", "ca-certificates")
DEFAULT_KERNEL = "linux-image-amd64"
_SUITE = re.compile(r"^[a-z][a-z0-9-]{1,31}$")
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(?:[:/=][A-Za-z0-9+.~:-]+)?$")


class RootfsError(CoresliceError):
    """mmdebstrap or a tarball read failed while building (exit 1)."""


@dataclass
class TarballInfo:
    path: Path
    bytes: int = 0  # sum of member sizes
    members: int = 0
    kernels: dict[str, dict[str, str]] = field(default_factory=dict)  # release -> {vmlinuz, initrd}
    modules: dict[str, bool] = field(default_factory=dict)  # release -> has an nvme driver
    init: bool = False
    cloud_init: bool = False
    sshd: bool = False
    ifupdown: bool = False

    def release(self, wanted: str | None = None) -> str:
        """The kernel release the image boots: the newest with vmlinuz, initrd and modules."""
        usable = sorted(r for r, k in self.kernels.items() if "vmlinuz" in k and "initrd" in k and r in self.modules)
        if wanted is not None:
            if wanted not in usable:
                raise UsageError(f"{self.path} has no usable kernel {wanted} (has: {', '.join(usable) or 'none'}); "
                                 "pass one of those or --kernel-deb")
            return wanted
        if not usable:
            found = ", ".join(sorted(self.kernels)) or "none"
            raise UsageError(f"{self.path} holds no kernel with its initrd and modules in /boot and /lib/modules "
                             f"(kernels seen: {found}); build from --debian, or add the slice kernel with --kernel-deb")
        return usable[-1]


_KERNEL = re.compile(r"^(?:\./)?boot/(vmlinuz|initrd\.img)-(.+)$")
_MODDIR = re.compile(r"^(?:\./)?(?:usr/)?lib/modules/([^/]+)/(.*)$")


def scan_tarball(path: Path) -> TarballInfo:
    """Read the whole tarball once (see the module docstring); UsageError when it is not a
    complete tar archive."""
    info = TarballInfo(path)
    dirs, orphan = {""}, None
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                info.members += 1
                norm = m.name.removeprefix("./").strip("/")
                if m.isdir():
                    dirs.add(norm)
                if orphan is None and norm and os.path.dirname(norm) not in dirs:
                    orphan = norm  # mkfs.ext4 -d creates no missing parents (tar would)
                info.bytes += m.size
                name = m.name
                k = _KERNEL.match(name)
                if k and (m.isfile() or m.issym()):
                    info.kernels.setdefault(k.group(2), {})[
                        "vmlinuz" if k.group(1) == "vmlinuz" else "initrd"] = name
                mm = _MODDIR.match(name)
                if mm:
                    rel, rest = mm.group(1), mm.group(2)
                    has = info.modules.get(rel, False)
                    info.modules[rel] = has or rest.startswith("kernel/drivers/nvme/host/nvme.ko")
                    if rest == "modules.builtin" and m.isfile():
                        data = tar.extractfile(m).read()  # type: ignore[union-attr]
                        info.modules[rel] = info.modules[rel] or b"drivers/nvme/host/nvme.ko" in data
                base = name.removeprefix("./")
                if base in ("sbin/init", "usr/sbin/init", "lib/systemd/systemd", "usr/lib/systemd/systemd"):
                    info.init = True
                elif base in ("usr/bin/cloud-init",):
                    info.cloud_init = True
                elif base in ("usr/sbin/sshd",):
                    info.sshd = True
                elif base in ("sbin/ifup", "usr/sbin/ifup"):
                    info.ifupdown = True
            # tarfile takes a short read at a member boundary for the end: a tar cut there (an
            # interrupted copy) would pass.  A complete one ends in two zero blocks (POSIX ustar).
            tar.fileobj.seek(tar.offset)
            if tar.fileobj.read(1024) != bytes(1024):
                raise tarfile.ReadError(f"no end-of-archive marker after {info.members} entries")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        what = "truncated or damaged" if isinstance(e, (EOFError, tarfile.ReadError)) else "unreadable"
        raise UsageError(f"--rootfs {path} is {what} ({e}); download it again and check its --sha256") from None
    if info.members == 0:
        raise UsageError(f"--rootfs {path} is an empty archive; give a root file system tarball")
    if orphan is not None:
        raise UsageError(f"--rootfs {path} lists {orphan} before (or without) its directory, which mkfs.ext4 -d "
                         "cannot follow; re-pack it with directories first (tar -C DIR -cf root.tar .)")
    return info


def extract_boot_files(tarball: Path, info: TarballInfo, release: str, out_dir: Path) -> dict[str, Path]:
    """Copy the kernel and initrd of ``release`` out of the tarball (following one symlink
    level inside /boot), for ``coreslice boot``."""
    out: dict[str, Path] = {}
    with tarfile.open(tarball, "r:*") as tar:
        for kind, name in info.kernels[release].items():
            m = tar.getmember(name)
            if m.issym():
                m = tar.getmember(os.path.normpath(os.path.join(os.path.dirname(name), m.linkname)))
            dest = out_dir / ("vmlinuz" if kind == "vmlinuz" else "initrd.img")
            src = tar.extractfile(m)
            if src is None:
                raise RootfsError(f"{name} in {tarball} is not a regular file")
            with open(dest, "wb") as f:
                shutil.copyfileobj(src, f, 1 << 20)
            out[kind] = dest
    return out


# -- Debian packages -------------------------------------------------------------------------

def check_suite(suite: str) -> str:
    if not _SUITE.match(suite):
        raise UsageError(f"--debian {suite!r} is not a Debian suite name; write e.g. bookworm")
    return suite


def check_packages(text: Sequence[str]) -> tuple[str, ...]:
    out = []
    for item in text:
        for p in re.split(r"[,\s]+", item.strip()):
            if not p:
                continue
            if not _PACKAGE.match(p):
                raise UsageError(f"--packages: {p!r} is not a Debian package name; write e.g. openssh-server,curl")
            out.append(p)
    return tuple(out)


def check_kernel_deb(path: Path) -> dict[str, str]:
    """A readable linux-image .deb: its Package, Version and Architecture fields."""
    try:
        proc = subprocess.run(["dpkg-deb", "-f", str(path), "Package", "Version", "Architecture"],
                              capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise UsageError("dpkg-deb is not installed; --kernel-deb needs Debian's dpkg") from None
    if proc.returncode != 0:
        raise UsageError(f"--kernel-deb {path} is not a readable .deb ({proc.stderr.strip().splitlines()[-1:] or '?'}); "
                         "give the slice kernel's linux-image package file")
    fields = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    if not fields.get("Package", "").startswith("linux-image-"):
        raise UsageError(f"--kernel-deb {path} is package {fields.get('Package')!r}, not a linux-image-*; "
                         "give the kernel image package (its modules come with it)")
    return fields


def _source_entries(etc: Path) -> list[tuple[str, str, str | None]]:
    """(uri, suite, signed-by) of every enabled ``deb`` source, deb822 or one-line format."""
    out = []
    for f in [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*"))]:
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict((k.strip(), v.strip()) for k, _, v in
                              (ln.partition(":") for ln in stanza.splitlines() if ln and ln[0] not in " #"))
                if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                    out += [(u, s, fields.get("Signed-By")) for u in fields.get("URIs", "").split()
                            for s in fields.get("Suites", "").split()]
        elif f.suffix == ".list" or f.name == "sources.list":
            for line in text.splitlines():
                parts = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(parts) >= 3 and parts[0] == "deb":
                    out.append((parts[1], parts[2], None))
    return out


def host_sources(suite: str, etc: Path = Path("/etc/apt")) -> list[str]:
    """One-line apt entries for ``suite`` (and -updates, -security) built from the archive
    URIs this machine's own Debian sources use; [] when none are found (mmdebstrap then uses
    its default)."""
    entries = _source_entries(etc)
    main = list(dict.fromkeys(u for u, s, _ in entries if "-" not in s))
    security = list(dict.fromkeys(u for u, s, _ in entries if s.endswith("-security")))
    signed = next((k for _, _, k in entries if k), None)
    opt = f"[signed-by={signed}] " if signed else ""
    return ([f"deb {opt}{u} {suite} main" for u in main] + [f"deb {opt}{u} {suite}-updates main" for u in main]
            + [f"deb {opt}{u} {suite}-security main" for u in security])


def mmdebstrap_argv(suite: str, packages: Sequence[str], kernel_debs: Sequence[Path], sources: Sequence[str],
                    out: Path) -> list[str]:
    """The mmdebstrap command line (pure).  Local kernel packages go in by path (mmdebstrap
    installs them with apt, so their dependencies come too); without any, the suite's own
    linux-image-amd64."""
    # Each .deb path is its own --include (mmdebstrap does not split paths); the hook copies
    # them into the chroot, where dpkg looks for them under the same path, and out again.
    debs = [f"--include={Path(d).resolve()}" for d in kernel_debs]
    include = [*BASE_PACKAGES, *packages] + ([] if debs else [DEFAULT_KERNEL])
    argv = ["mmdebstrap", "--variant=apt", "--format=tar", "--skip=cleanup/reproducible",
            *(["--hook-dir=/usr/share/mmdebstrap/hooks/file-mirror-automount"] if debs else []), *debs,
            # Docs, man pages and locales are dead weight on a slice disk.
            "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--dpkgopt=path-exclude=/usr/share/locale/*", "--dpkgopt=path-include=/usr/share/locale/locale.alias",
            f"--include={','.join(include)}", suite, str(out), *sources]
    return argv


def cache_key(suite: str, packages: Sequence[str], kernel_debs: Sequence[Path], sources: Sequence[str]) -> str:
    """A stable key over every input of a --debian root (kernel packages by content)."""
    h = hashlib.sha256(json.dumps({"suite": suite, "packages": sorted(packages), "sources": list(sources),
                                   "base": BASE_PACKAGES, "v": 1}).encode())
    for d in kernel_debs:
        with open(d, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:20]


def build_debian(suite: str, packages: Sequence[str], kernel_debs: Sequence[Path], sources: Sequence[str],
                 out: Path, progress: Callable[[str], None]) -> None:
    """Run mmdebstrap into ``out`` through a temporary name renamed when complete (an
    interrupted build never looks finished), relaying its steps as progress."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    argv = mmdebstrap_argv(suite, packages, kernel_debs, sources, tmp)
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except FileNotFoundError:
        raise UsageError("mmdebstrap is not installed; run scripts/install-system-deps.sh") from None
    tail: list[str] = []
    first_error = None  # the cause (e.g. "dpkg: error: ..."), often far above mmdebstrap's last lines
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-3:]
        if first_error is None and re.search(r"\berror\b|^E: ", line, re.I):
            first_error = line
        if line.startswith("I: "):
            progress("mmdebstrap: " + line[3:])
    if proc.wait() != 0:
        tmp.unlink(missing_ok=True)
        cause = [first_error] if first_error and first_error not in tail else []
        raise RootfsError(f"mmdebstrap exited with {proc.returncode}: {' | '.join(cause + tail)}")
    os.replace(tmp, out)


# -- slice kernel packages into a tarball root (the prototype's dpkg + apt --fix-broken) ----

def chroot_install_script(debs: Sequence[str]) -> str:
    """What runs inside the extracted root (sh): install the kernel packages, let apt bring
    what they depend on, and make sure an initramfs exists for each kernel installed."""
    names = " ".join(shlex.quote(f"/tmp/coreslice-debs/{Path(d).name}") for d in debs)
    # Absolute paths: the root's own tools, never a shell's built-in applet of the same name.
    return ("set -e; export DEBIAN_FRONTEND=noninteractive; "
            f"/usr/bin/dpkg -i {names} || /usr/bin/apt-get -y -q -f install; "
            "for k in /lib/modules/*; do r=${k##*/}; [ -e /boot/initrd.img-$r ] || "
            "/usr/sbin/update-initramfs -c -k $r; done")


def install_debs_into_tarball(tarball: Path, debs: Sequence[Path], out: Path, progress: Callable[[str], None]) -> None:
    """Extract ``tarball``, install ``debs`` in a chroot of it and pack it again into ``out``.

    Needs root (a chroot, and the tree's owners kept on extraction).  The chroot's /proc, /sys
    and /dev are mounted in a mount namespace of its own (``unshare --mount``), so they vanish
    with that process whatever happens: nothing is left mounted on this machine."""
    if os.geteuid() != 0:
        raise UsageError("--kernel-deb with --rootfs installs packages in a chroot of the tarball, which needs "
                         "root; run as root, or build from --debian (no root needed)")
    work = Path(tempfile.mkdtemp(prefix=".coreslice-chroot-", dir=out.parent))
    root = work / "root"
    try:
        root.mkdir()
        progress(f"extracting {tarball.name} for the kernel packages")
        _tool(["tar", "-x", "-p", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-f", str(tarball),
               "-C", str(root)], "extracting the root tarball")
        (root / "tmp/coreslice-debs").mkdir(parents=True, exist_ok=True)
        for d in debs:
            shutil.copyfile(d, root / "tmp/coreslice-debs" / Path(d).name)
        # apt -f install may need the network: this machine's resolver while in the chroot, the
        # root's own file (or none) again afterwards.
        theirs = root / "etc/resolv.conf"
        saved = theirs.read_bytes() if theirs.is_file() and not theirs.is_symlink() else None
        lent = Path("/etc/resolv.conf").is_file() and not theirs.is_symlink()
        if lent:
            shutil.copyfile("/etc/resolv.conf", theirs)
        (root / "tmp/coreslice-debs/install.sh").write_text(chroot_install_script(debs) + "\n")
        r = shlex.quote(str(root))
        mounts = (f"mount -t proc proc {r}/proc && mount --rbind /sys {r}/sys && mount --rbind /dev {r}/dev && "
                  f"chroot {r} /bin/sh /tmp/coreslice-debs/install.sh")
        progress("installing the kernel packages in a chroot (dpkg -i, then apt-get -f install)")
        _tool(["unshare", "--mount", "--propagation", "private", "sh", "-c", mounts], "installing the kernel packages")
        shutil.rmtree(root / "tmp/coreslice-debs")
        if lent:
            if saved is None:
                theirs.unlink(missing_ok=True)
            else:
                theirs.write_bytes(saved)
        progress(f"packing the root again as {out.name}")
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        _tool(["tar", "-c", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-f", str(tmp), "-C", str(root), "."],
              "packing the root")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tool(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise RootfsError(f"{what} failed ({argv[0]} exited {proc.returncode}): {tail}")
