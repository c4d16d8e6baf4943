"""vm/qmp.py: pinning the vCPU threads query-cpus-fast names, and checking the masks took."""

from __future__ import annotations

import errno

import pytest

from coreslice.errors import LaunchError
from coreslice.vm.qmp import pin_threads

CPUS = [{"cpu-index": 1, "thread-id": 502}, {"cpu-index": 0, "thread-id": 501}]


class Affinity:
    """sched_setaffinity/sched_getaffinity against a dict of thread -> mask."""

    def __init__(self, confine=None):
        self.masks, self.confine = {}, confine

    def set(self, tid, cpus):
        self.masks[tid] = set(cpus) & self.confine if self.confine else set(cpus)

    def get(self, tid):
        return self.masks[tid]


def test_each_thread_pinned_to_its_cpu():
    a = Affinity()
    assert pin_threads(CPUS, {0: 2, 1: 3}, a.set, a.get) == {0: {"cpu": 2, "thread": 501},
                                                              1: {"cpu": 3, "thread": 502}}
    assert a.masks == {501: {2}, 502: {3}}


@pytest.mark.parametrize("pinning", [{0: 2}, {0: 2, 1: 3, 2: 4}, {0: 2, 2: 3}])
def test_vcpus_not_matching_the_plan(pinning):
    a = Affinity()
    with pytest.raises(LaunchError, match="QEMU reports vCPUs \\[0, 1\\]"):
        pin_threads(CPUS, pinning, a.set, a.get)
    assert a.masks == {}


def test_mask_that_did_not_take():
    a = Affinity(confine={2, 5})  # a cpuset without CPU 3: the kernel keeps the thread elsewhere
    with pytest.raises(LaunchError, match="vCPU 1 .*cpuset"):
        pin_threads(CPUS, {0: 2, 1: 3}, a.set, a.get)


def test_setaffinity_failing():
    def refuse(tid, cpus):
        raise OSError(errno.EINVAL, "Invalid argument")
    with pytest.raises(LaunchError, match="pinning vCPU 0 \\(thread 501\\) to CPU 2 failed: Invalid argument"):
        pin_threads(CPUS, {0: 2, 1: 3}, refuse, lambda tid: {2})
