"""End-to-end tests boot the emulated machine (QEMU under TCG): slow, marked ``e2e``.

Every QEMU that a test starts (through coreslice.testbed.qemu) is tracked by PID; after each
test any that is still alive is killed by its PID and the test fails.
"""

import os
import shutil
import signal

import pytest

from coreslice.testbed import qemu


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def _reap_qemu():
    yield
    left = sorted(qemu.LIVE_PIDS)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        qemu.LIVE_PIDS.discard(pid)
    assert not left, f"QEMU processes left running (killed by PID): {left}"


@pytest.fixture(scope="session")
def debian_kernel():
    """The stock Debian kernel the testbed uses, fetched into the cache on first use (unit tests
    get a synthetic bzImage under this name instead: tests/unit/conftest.py)."""
    from coreslice.testbed.kernels import ensure_kernel

    return ensure_kernel()


@pytest.fixture(scope="session")
def testbed_ready():
    """Fail (never skip) when QEMU or busybox is missing; cache kernel + initramfs."""
    if shutil.which(qemu.QEMU) is None:
        pytest.fail(f"{qemu.QEMU} not installed: run scripts/install-system-deps.sh")
    from coreslice.testbed import initramfs, kernels

    if not initramfs.BUSYBOX.is_file():
        pytest.fail("busybox-static not installed: run scripts/install-system-deps.sh")
    k = kernels.ensure_kernel()
    return k, initramfs.build_host_initramfs(k), initramfs.build_slice_initramfs(k)


@pytest.fixture
def run_dir(request):
    """A fresh run directory per test under the cache, kept for the post-mortem (a module may
    define its own)."""
    import time

    from coreslice.testbed.paths import cache_dir
    return cache_dir() / "test-runs" / f"{request.node.name}-{time.strftime('%H%M%S')}-{os.getpid()}"
