"""What the emulated host sees: shares of their own for the tree, the venv and the kernels."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from coreslice.errors import UsageError
from coreslice.testbed import hostview


def test_mount_points_dedupe_and_order_parents_first(tmp_path):
    a = tmp_path / "proj"
    (a / ".venv").mkdir(parents=True)
    cache = tmp_path / "cache" / "kernels" / "v" / "boot"
    cache.mkdir(parents=True)
    initrds = tmp_path / "cache" / "initramfs"
    initrds.mkdir()
    got = hostview.mount_points([a / ".venv", cache, a, initrds, a])
    assert got == sorted(got, key=lambda p: len(p.parts))
    assert a in got and a / ".venv" not in got  # inside the project: shared with it
    assert cache in got and initrds in got
    assert len(got) == 3


def test_the_root_itself_is_never_a_share_of_its_own():
    assert hostview.mount_points([Path("/")]) == []


@pytest.mark.parametrize("p", ["/proc/self", "/sys/kernel", "/dev/shm/x", "/dev"])
def test_paths_under_proc_sys_dev_are_refused(p):
    with pytest.raises(UsageError, match="mounts over"):
        hostview.mount_points([Path(p)])


def test_tmp_and_run_paths_are_shared_not_refused():
    assert hostview.mount_points([Path("/tmp/x/src"), Path("/run/y")]) == [Path("/run/y"), Path("/tmp/x/src")]


def test_render_mounts_file():
    pairs, text = hostview.render_mounts([Path("/tmp/a b"), Path("/tmp/a b/c")])
    assert pairs == [("share0", Path("/tmp/a b")), ("share1", Path("/tmp/a b/c"))]
    # The host init reads "TAG PATH" with `read -r tag path`: the path may hold spaces.
    assert text == "share0 /tmp/a b\nshare1 /tmp/a b/c\n"


def test_host_python_is_the_venv_interpreter_and_shares_the_tree():
    hp = hostview.host_python()
    assert (Path(hp.pythonpath) / "coreslice" / "__init__.py").is_file()
    assert hostview.source_root() in hp.shares
    if sys.prefix != sys.base_prefix:
        # The venv's own bin/python (a symlink), never the base interpreter behind it: only
        # the unresolved path finds pyvenv.cfg and so the venv's packages (pyroute2).
        assert hp.interpreter == str(Path(sys.prefix) / "bin" / "python")
        assert Path(sys.prefix).resolve() in hp.shares or any(
            Path(sys.prefix).resolve().is_relative_to(s) for s in hp.shares)
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": hp.pythonpath}
    proc = subprocess.run([hp.interpreter, "-c", "import pyroute2, coreslice; print(coreslice.__file__)"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(hp.pythonpath)
