"""A new user's first run: the README's steps on a pristine Debian 12, from any folder.

CI runs on a machine that already has everything, so these tests rebuild the new user's
situation instead of trusting it:

- the install scripts run inside a pristine Debian 12 root file system (mmdebstrap, minbase,
  Debian's packages only; built once and cached as a tarball, unpacked afresh for every run),
  once with a deb822 ``debian.sources`` and once with a one-line ``sources.list`` (as the
  Debian installer writes it).  The root gets what any machine on this network has: the name
  servers, pip's configuration and the certificate authorities it needs (a fresh root's
  bundle lacks the local one, and pip then fails with CERTIFICATE_VERIFY_FAILED);
- the testbed boots a slice from a copy of the tree under /tmp, with its own venv there, and
  runs ``coreslice list`` inside the emulated host;
- the demo runs and its output is read as a user would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import coreslice
from coreslice.testbed import qemu
from coreslice.testbed.hostview import source_root
from coreslice.testbed.paths import cache_dir

pytestmark = pytest.mark.e2e
ROOT = source_root()


def copy_working_tree(dst: Path) -> None:
    """The working tree as a clone would hold it, uncommitted changes included: every file
    git tracks or would track (not the ignored ones: no .venv, no caches)."""
    names = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "-co", "--exclude-standard"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, names):
        src = ROOT / rel
        if not os.path.lexists(src):  # deleted in the working tree
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / rel, follow_symlinks=False)


def stop_qemu_of(run_dir: Path) -> int | None:
    """Kill the QEMU a child testbed started in ``run_dir`` (by the PID it recorded), if it is
    still alive; return that PID."""
    try:
        pid = int((run_dir / qemu.PID_FILE).read_text())
    except (OSError, ValueError):
        return None
    try:
        if f"{qemu.QEMU}" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
            os.kill(pid, signal.SIGKILL)
            return pid
    except (OSError, ProcessLookupError):
        pass
    return None


def run_child(cmd, *, timeout, run_dir: Path, **kw) -> subprocess.CompletedProcess:
    """Run a testbed-starting command; its QEMU is stopped by PID whatever happens."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              start_new_session=True, **kw)
    finally:
        left = stop_qemu_of(run_dir)
        assert left is None, f"QEMU {left} was still running after {cmd[0]} ended (killed)"


# --- the testbed from a clone under /tmp ------------------------------------------------------


def test_testbed_boots_a_slice_from_a_clone_under_tmp(testbed_ready):
    clone = Path(tempfile.mkdtemp(prefix="coreslice-clone-", dir="/tmp"))
    run_dir = clone / "run"  # the run directory under /tmp as well
    try:
        copy_working_tree(clone)
        venv = subprocess.run(["bash", "scripts/setup-venv.sh"], cwd=clone, capture_output=True,
                              text=True, timeout=600)
        assert venv.returncode == 0, venv.stderr[-2000:]
        proc = run_child(
            [str(clone / ".venv/bin/coreslice"), "testbed", "run", "--json", "--quiet",
             "--workdir", str(run_dir), "--timeout", "300",
             "--slice", "--name tmpclone --cpus 1 --memory 256M@0x40000000",
             "--host-cmd", "coreslice list --json",
             "--host-cmd", "python -c 'import sys, pyroute2, coreslice; print(sys.prefix, coreslice.__file__)'"],
            timeout=420, run_dir=run_dir, cwd=clone,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        r = json.loads(proc.stdout)
        (s,) = r["slices"]
        assert s["exit_code"] == 0 and s["booted"], s["stderr"]
        assert s["cpus"] == 1 and s["apic_ids"] == [1]
        # The loader inside the host was the clone's, run by the clone's venv.
        assert f"coreslice {clone}/src/coreslice/__init__.py" in r["host"]["python_check"]
        listing, where = r["host_cmds"]
        assert listing["exit_code"] == 0, listing["output"]
        doc = json.loads(listing["output"][listing["output"].index("{"):])
        assert [(x["name"], x["state"]) for x in doc["slices"]] == [("tmpclone", "running")]
        assert where["exit_code"] == 0, where["output"]
        assert where["output"].split() == [f"{clone}/.venv", f"{clone}/src/coreslice/__init__.py"]
    finally:
        shutil.rmtree(clone, ignore_errors=True)


# --- the demo, read as a user reads it --------------------------------------------------------

_BAD = re.compile(r"error|fail|not found|traceback|warning", re.I)


def test_demo_reports_every_slice_and_no_error(testbed_ready):
    from coreslice.testbed import demo

    run_dir = cache_dir() / "test-runs" / f"demo-{time.strftime('%H%M%S')}-{os.getpid()}"
    proc = run_child([sys.executable, "-m", "coreslice", "demo", "--workdir", str(run_dir)],
                     timeout=420, run_dir=run_dir)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    lines = out.splitlines()
    # Lines streamed from the slices' consoles are their kernels' logs ("[slice A] ..."); a
    # stock kernel says "RAS: Correctable Errors collector" and, in slice B, whose RAM lies
    # above 4 GiB, "swiotlb ... Failed to allocate" (see README).  Everything coreslice itself
    # prints must be free of errors; "not found" and tracebacks must appear nowhere.
    own = [ln for ln in lines if not ln.startswith("[slice ")]
    assert not [ln for ln in own if _BAD.search(ln)], "\n".join(own)
    assert not [ln for ln in lines if re.search(r"not found|traceback", ln, re.I)]
    table = {ln.split()[0]: ln.split() for ln in own if re.match(r"^[AB]\s+--cpus", ln)}
    assert set(table) == {name for name, _, _ in demo.SLICES}
    for row in table.values():
        assert "yes" in row, row
    assert re.search(r"^A\s+running\s+1-2\s", out, re.M) and re.search(r"^B\s+running\s+3\s", out, re.M)
    assert re.search(r"IPIs received by the host .*: CAL \+0, RES \+0, TLB \+0", out)
    # Both consoles were streamed, each up to its slice's report line.
    for name, _, _ in demo.SLICES:
        assert any(ln.startswith(f"[slice {name}]") and "CORESLICE-REPORT" in ln for ln in lines)


# --- the install scripts on a pristine Debian 12 ----------------------------------------------

PRISTINE = "pristine"
SUITE = "bookworm"


def debian_sources() -> list[dict]:
    """The build machine's Debian sources, as (uris, suites, components, signed_by) records,
    read from either format: the pristine root uses the same archive, named by no one here."""
    out: list[dict] = []
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", f.read_text()):
            fields = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.strip()
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                out.append({"uris": fields.get("uris", "").split(), "suites": fields.get("suites", "").split(),
                            "components": fields.get("components", "").split(),
                            "signed_by": fields.get("signed-by")})
    for f in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]:
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.+)$", line)
            if m:
                out.append({"uris": [m[1]], "suites": [m[2]], "components": m[3].split(), "signed_by": None})
    return [s for s in out if any(x == SUITE or x.startswith(SUITE + "-") for x in s["suites"])
            and "backports" not in " ".join(s["suites"])]


def main_uri(sources: list[dict]) -> str:
    for s in sources:
        if SUITE in s["suites"]:
            return s["uris"][0]
    pytest.fail("the build machine has no APT source for Debian bookworm")


def write_sources(root: Path, fmt: str, sources: list[dict]) -> None:
    """Give the pristine root the build machine's Debian sources (no backports) in ``fmt``."""
    apt = root / "etc/apt"
    (apt / "sources.list").unlink(missing_ok=True)
    for f in (apt / "sources.list.d").glob("*"):
        f.unlink()
    if fmt == "deb822":
        text = "\n".join(
            f"Types: deb\nURIs: {' '.join(s['uris'])}\nSuites: {' '.join(s['suites'])}\n"
            f"Components: {' '.join(s['components'])}\n"
            + (f"Signed-By: {s['signed_by']}\n" if s["signed_by"] else "") for s in sources)
        (apt / "sources.list.d/debian.sources").write_text(text)
    else:  # what the Debian installer writes
        text = "".join(f"deb {u} {suite} {' '.join(s['components'])}\n"
                       for s in sources for u in s["uris"] for suite in s["suites"])
        (apt / "sources.list").write_text(text)


def pristine_tarball() -> Path:
    """A minbase Debian 12 root as a tarball, built once with mmdebstrap, keyed by its version."""
    if shutil.which("mmdebstrap") is None:
        pytest.fail("mmdebstrap not installed: run scripts/install-system-deps.sh --test")
    version = subprocess.run(["mmdebstrap", "--version"], capture_output=True, text=True).stdout.split()[-1]
    d = cache_dir() / PRISTINE
    d.mkdir(parents=True, exist_ok=True)
    tar = d / f"{SUITE}-minbase-mmdebstrap{version}.tar"
    if tar.is_file():
        return tar
    tmp = tar.with_name(f".{tar.name}.{os.getpid()}")
    proc = subprocess.run(["mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar", "--quiet",
                           SUITE, str(tmp), main_uri(debian_sources())],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        pytest.fail(f"mmdebstrap failed: {proc.stderr[-2000:]}")
    os.replace(tmp, tar)
    return tar


def pip_config_files() -> list[Path]:
    """pip's configuration on this machine and the local files it names (CA bundle,
    constraints): what a pip on this network needs."""
    files = [Path(p) for p in ("/etc/pip.conf", "/etc/xdg/pip/pip.conf", os.path.expanduser("~/.config/pip/pip.conf"),
                               os.path.expanduser("~/.pip/pip.conf"), os.environ.get("PIP_CONFIG_FILE", ""))
             if p and Path(p).is_file()]
    named = []
    for f in files:
        for m in re.finditer(r"^\s*(?:cert|constraint|client-cert)\s*=\s*(\S+)", f.read_text(), re.M):
            named.append(Path(m[1]))
    for k in ("PIP_CERT", "PIP_CONSTRAINT", "PIP_CLIENT_CERT"):
        if os.environ.get(k):
            named.append(Path(os.environ[k]))
    return files + [p for p in named if p.is_file()]


def network_settings(root: Path) -> None:
    """Copy this machine's name servers, pip configuration and local certificate authorities
    into ``root`` at the same paths (local CAs also where update-ca-certificates finds them, so
    that installing ca-certificates in the root keeps them)."""
    copies = [Path("/etc/resolv.conf"), *pip_config_files(),
              *Path("/usr/local/share/ca-certificates").glob("*.crt")]
    for src in copies:
        dst = root / str(src).lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.unlink(missing_ok=True)
        shutil.copyfile(src, dst)


def _mounted_below(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    with open("/proc/mounts") as f:
        return [ln.split()[1] for ln in f if ln.split()[1].startswith(prefix)]


def chroot_env() -> dict:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
           "LANG": "C.UTF-8", "TERM": "dumb"}
    env.update({k: v for k, v in os.environ.items()
                if k.startswith("PIP_") or k.lower() in ("http_proxy", "https_proxy", "no_proxy")})
    return env


@pytest.mark.parametrize("fmt", ["deb822", "one-line"])
def test_install_scripts_on_a_pristine_debian_12(fmt):
    if os.geteuid() != 0:
        pytest.fail("the pristine-root install test needs root (chroot, mount)")
    tar = pristine_tarball()
    sources = debian_sources()
    archives = cache_dir() / PRISTINE / "apt-archives"  # downloaded .debs, reused between runs
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f"coreslice-pristine-{fmt}-", dir=str(cache_dir() / PRISTINE)))
    mounts: list[Path] = []
    try:
        subprocess.run(["tar", "-xf", str(tar), "-C", str(root)], check=True)
        assert not (root / "usr/bin/python3").exists() and not (root / "usr/bin/qemu-system-x86_64").exists()
        write_sources(root, fmt, sources)
        network_settings(root)
        tree = root / "root/coreslice"
        copy_working_tree(tree)
        for what, target, args in (("proc", root / "proc", ["-t", "proc", "proc"]),
                                   ("dev", root / "dev", ["--bind", "/dev"]),
                                   ("debs", root / "var/cache/apt/archives", ["--bind", str(archives)])):
            target.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", *args, str(target)], check=True)
            mounts.append(target)
        script = ("set -e; cd /root/coreslice; bash scripts/install-system-deps.sh; "
                  "bash scripts/setup-venv.sh; .venv/bin/coreslice --version; "
                  "qemu-system-x86_64 --version | head -n 1; iasl -v | grep -i version")
        proc = subprocess.run(["chroot", str(root), "/bin/bash", "-c", script], capture_output=True,
                              text=True, timeout=1200, env=chroot_env(), stdin=subprocess.DEVNULL)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        assert f"coreslice {coreslice.__version__}" in proc.stdout
        m = re.search(r"QEMU emulator version (\d+)\.", proc.stdout)
        assert m and int(m[1]) >= 10, proc.stdout
        assert re.search(r"ASL\+? Optimizing Compiler", log, re.I), log[-2000:]
        assert "enabled bookworm-backports" in log
        enabled = (root / "etc/apt/sources.list.d" /
                   ("coreslice-backports.sources" if fmt == "deb822" else "coreslice-backports.list")).read_text()
        assert "bookworm-backports" in enabled and main_uri(sources) in enabled
        # A second run finds everything in place and changes nothing.
        again = subprocess.run(["chroot", str(root), "/bin/bash", "-c",
                                "cd /root/coreslice && bash scripts/install-system-deps.sh"],
                               capture_output=True, text=True, timeout=300, env=chroot_env())
        assert again.returncode == 0 and "all system packages present" in again.stderr, again.stderr
    finally:
        for target in reversed(mounts):
            if subprocess.run(["umount", str(target)], check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(target)], check=False)
        left = _mounted_below(root)
        # Never delete a tree that still has /dev or the package cache mounted inside it.
        assert not left, f"still mounted below {root}: {left}; not removed"
        shutil.rmtree(root, ignore_errors=True)
