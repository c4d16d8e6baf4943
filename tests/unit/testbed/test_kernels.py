"""Kernel cache: resolution through apt (faked) and completeness of cached directories."""

import json
import subprocess

import pytest

from coreslice.testbed import kernels

POLICY = """linux-image-amd64:
  Installed: (none)
  Candidate: 6.12.95-1~bpo12+1
  Version table:
"""
SHOW = "Package: linux-image-amd64\nVersion: 6.12.95-1~bpo12+1\nDepends: linux-image-6.12.95+deb12-amd64 (= 6.12.95-1~bpo12+1)\n"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CORESLICE_CACHE", str(tmp_path))
    return tmp_path


def _fake_apt(monkeypatch, calls):
    def run_tool(argv, **kw):
        calls.append(list(argv))
        out = ""
        if argv[:2] == ["apt-cache", "-t"] and argv[-1] == "linux-image-amd64":
            out = POLICY
        elif argv[:2] == ["apt-cache", "show"]:
            out = SHOW
        return subprocess.CompletedProcess(argv, 0, out, "")

    monkeypatch.setattr(kernels, "run_tool", run_tool)


def _make_cached(cache, version="6.12.95-1~bpo12+1", release="6.12.95+deb12-amd64", stamp=True):
    d = cache / "kernels" / version
    (d / "boot").mkdir(parents=True)
    (d / f"boot/vmlinuz-{release}").write_bytes(b"bz")
    mods = d / "lib/modules" / release
    mods.mkdir(parents=True)
    (mods / "modules.dep").write_text("")
    if stamp:
        (d / "kernel.json").write_text(json.dumps({
            "version": version, "package": f"linux-image-{release}", "release": release,
            "vmlinuz": f"boot/vmlinuz-{release}", "modules_dir": f"lib/modules/{release}",
        }))
    return d


def test_resolve_through_metapackage(monkeypatch):
    calls = []
    _fake_apt(monkeypatch, calls)
    assert kernels.resolve_package(None) == ("linux-image-6.12.95+deb12-amd64", "6.12.95-1~bpo12+1")
    assert calls[0] == ["apt-cache", "-t", "bookworm-backports", "policy", "linux-image-amd64"]
    assert calls[1] == ["apt-cache", "show", "linux-image-amd64=6.12.95-1~bpo12+1"]


def test_cached_kernel_used_without_download(cache, monkeypatch):
    calls = []
    _fake_apt(monkeypatch, calls)
    _make_cached(cache)
    k = kernels.ensure_kernel()
    assert k.release == "6.12.95+deb12-amd64"
    assert k.vmlinuz.name == "vmlinuz-6.12.95+deb12-amd64"
    assert k.modules_dir.name == "6.12.95+deb12-amd64"
    assert not any(c[0] == "apt-get" for c in calls)
    # An explicit cached version needs no apt at all.
    calls.clear()
    assert kernels.ensure_kernel("6.12.95+deb12-amd64") == k
    assert calls == []


def test_partial_directories_are_not_complete(cache):
    _make_cached(cache, stamp=False)  # no kernel.json: interrupted unpack
    tmp = cache / "kernels" / ".tmp-6.12.95-1~bpo12+1-123"
    tmp.mkdir()
    assert kernels.cached_kernels() == []


def test_unpack_path_taken_when_not_cached(cache, monkeypatch):
    calls = []
    _fake_apt(monkeypatch, calls)
    seen = {}

    def fake_unpack(package, version):
        seen["args"] = (package, version)
        return "K"

    monkeypatch.setattr(kernels, "_unpack", fake_unpack)
    assert kernels.ensure_kernel() == "K"
    assert seen["args"] == ("linux-image-6.12.95+deb12-amd64", "6.12.95-1~bpo12+1")
