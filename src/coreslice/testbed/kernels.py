"""The stock Debian kernel the testbed boots, as host and as slice kernel.

The kernel is the newest ``linux-image-6.12.*-amd64`` from bookworm-backports, resolved through
the ``linux-image-amd64`` metapackage with ``apt-cache -t bookworm-backports``, fetched with
``apt-get download`` and unpacked with ``dpkg -x`` into the cache -- never installed into /boot.

Cache layout (keyed by package version)::

    $CORESLICE_CACHE/kernels/<package version>/
        boot/vmlinuz-<release>
        lib/modules/<release>/...      (with modules.dep: depmod runs after unpacking)
        kernel.json                    (written last; marks the directory complete)

Unpacking happens in a temporary sibling directory that is renamed into place only when
complete, so an interrupted run never leaves a directory that looks finished.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from coreslice.errors import UsageError
from coreslice.testbed.paths import cache_dir
from coreslice.testbed.tools import ToolError, progress, run_tool

SUITE = "bookworm-backports"
METAPACKAGE = "linux-image-amd64"
SERIES = "6.12."
_STAMP = "kernel.json"


@dataclass(frozen=True)
class Kernel:
    version: str  # Debian package version, e.g. "6.12.95-1~bpo12+1"
    package: str  # e.g. "linux-image-6.12.95+deb12-amd64"
    release: str  # uname -r, e.g. "6.12.95+deb12-amd64"
    vmlinuz: Path
    modules_dir: Path  # .../lib/modules/<release>

    @property
    def root(self) -> Path:
        return self.modules_dir.parents[2]


def kernels_dir() -> Path:
    d = cache_dir() / "kernels"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+~_-]", "_", name)


def _load(entry: Path) -> Kernel | None:
    stamp = entry / _STAMP
    if not stamp.is_file():
        return None
    try:
        meta = json.loads(stamp.read_text())
        k = Kernel(
            version=meta["version"],
            package=meta["package"],
            release=meta["release"],
            vmlinuz=entry / meta["vmlinuz"],
            modules_dir=entry / meta["modules_dir"],
        )
    except (ValueError, KeyError, OSError):
        return None
    if not (k.vmlinuz.is_file() and (k.modules_dir / "modules.dep").is_file()):
        return None
    return k


def cached_kernels() -> list[Kernel]:
    """Complete kernels in the cache (temporary and partial directories are skipped)."""
    out = []
    for entry in sorted(kernels_dir().iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        k = _load(entry)
        if k is not None:
            out.append(k)
    return out


def _apt_field(text: str, field: str) -> str | None:
    m = re.search(rf"^{re.escape(field)}:\s*(.+)$", text, re.M)
    return m.group(1).strip() if m else None


def _candidate(package: str) -> str | None:
    proc = run_tool(["apt-cache", "-t", SUITE, "policy", package], check=False)
    m = re.search(r"Candidate:\s*(\S+)", proc.stdout or "")
    cand = m.group(1) if m else None
    return None if cand in (None, "(none)") else cand


def resolve_package(version: str | None = None) -> tuple[str, str]:
    """Return ``(package, package_version)`` of the kernel image to use.

    ``version`` may be None (newest 6.12 from bookworm-backports), a version of the
    ``linux-image-amd64`` metapackage (``6.12.95-1~bpo12+1``) or a kernel release
    (``6.12.95+deb12-amd64``).
    """
    if version and version.endswith("-amd64"):
        package = f"linux-image-{version}"
        pkg_version = _candidate(package)
        if pkg_version is None:
            raise UsageError(
                f"kernel {version}: package {package} is not known to apt; run apt-get update, "
                f"or pick a version from: apt-cache -t {SUITE} policy {METAPACKAGE}"
            )
        return package, pkg_version
    meta_version = version or _candidate(METAPACKAGE)
    if meta_version is None:
        raise ToolError(
            f"{METAPACKAGE}: no candidate in {SUITE}; enable it and run apt-get update "
            "(scripts/install-system-deps.sh does both)"
        )
    proc = run_tool(["apt-cache", "show", f"{METAPACKAGE}={meta_version}"], check=False)
    depends = _apt_field(proc.stdout or "", "Depends")
    m = re.search(r"(linux-image-[0-9][^\s,(]*)\s*\(=\s*([^)\s]+)\)", depends or "")
    if proc.returncode != 0 or not m:
        raise UsageError(
            f"kernel version {meta_version}: not found as {METAPACKAGE} version; "
            f"list them with: apt-cache madison {METAPACKAGE}"
        )
    package, pkg_version = m.group(1), m.group(2)
    if not package.startswith(f"linux-image-{SERIES}"):
        raise UsageError(
            f"{METAPACKAGE} {meta_version} depends on {package}, not a {SERIES}* kernel: "
            f"is {SUITE} enabled (scripts/install-system-deps.sh) and apt-get update run?"
        )
    return package, pkg_version


def _unpack(package: str, pkg_version: str) -> Kernel:
    release = package.removeprefix("linux-image-").removesuffix("-unsigned")
    final = kernels_dir() / _safe(pkg_version)
    tmp = kernels_dir() / f".tmp-{_safe(pkg_version)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "deb").mkdir(parents=True)
    try:
        progress(f"downloading {package} {pkg_version} (about 100 MB)")
        run_tool(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
             f"{package}={pkg_version}"],
            cwd=str(tmp / "deb"),
        )
        debs = list((tmp / "deb").glob("*.deb"))
        if len(debs) != 1:
            raise ToolError(f"apt-get download {package}: expected one .deb, found {debs}")
        root = tmp / "root"
        progress(f"unpacking {debs[0].name}")
        run_tool(["dpkg", "-x", str(debs[0]), str(root)])
        vmlinuz = root / "boot" / f"vmlinuz-{release}"
        modules = root / "lib" / "modules" / release
        if not vmlinuz.is_file() or not modules.is_dir():
            raise ToolError(f"{debs[0].name}: no boot/vmlinuz-{release} or lib/modules/{release}")
        progress(f"generating modules.dep for {release}")
        run_tool(["depmod", "-b", str(root), release])
        meta = {
            "version": pkg_version,
            "package": package,
            "release": release,
            "vmlinuz": str(vmlinuz.relative_to(root)),
            "modules_dir": str(modules.relative_to(root)),
        }
        (root / _STAMP).write_text(json.dumps(meta, indent=1) + "\n")
        try:
            os.rename(root, final)
        except OSError:
            # Another process finished first (or a stale incomplete dir is in the way).
            if _load(final) is None:
                shutil.rmtree(final, ignore_errors=True)
                os.rename(root, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    k = _load(final)
    if k is None:
        raise ToolError(f"{final}: unpacked kernel is incomplete")
    progress(f"kernel {k.release} ready in {final}")
    return k


def ensure_kernel(version: str | None = None) -> Kernel:
    """The kernel to boot, fetched and unpacked into the cache if needed (idempotent).

    An explicit ``version`` that is already cached (as package version, release or package
    name) is used without asking apt; with ``None`` apt picks the newest 6.12 kernel, and if
    apt cannot answer the newest cached kernel is used.
    """
    cached = cached_kernels()
    if version:
        for k in cached:
            if version in (k.version, k.release, k.package):
                return k
    try:
        package, pkg_version = resolve_package(version)
    except (ToolError, UsageError):
        if version is None and cached:
            k = max(cached, key=lambda c: c.vmlinuz.stat().st_mtime)
            progress(f"apt could not resolve {METAPACKAGE}; using cached kernel {k.release}")
            return k
        raise
    for k in cached:
        if k.version == pkg_version and k.package == package:
            return k
    return _unpack(package, pkg_version)


def kernel_info(k: Kernel) -> dict:
    d = asdict(k)
    return {key: str(v) for key, v in d.items()}


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    try:
        print(json.dumps(kernel_info(ensure_kernel(sys.argv[1] if len(sys.argv) > 1 else None))))
    except subprocess.SubprocessError as exc:
        sys.exit(str(exc))
