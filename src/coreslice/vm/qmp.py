"""Pinning a paused VM's vCPU threads, through QMP (the qemu.qmp library).

QEMU runs each vCPU in a thread of its own; QMP's query-cpus-fast (qapi/machine.json) names each
vCPU's index and host thread id.  The launcher starts QEMU with -S (paused), pins every vCPU
thread to its host CPU with sched_setaffinity, checks the mask took, and only then lets the guest
run (cont), so no guest instruction runs on a CPU it should not.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from coreslice.errors import LaunchError


def pin_threads(cpus: list[dict], pinning: dict[int, int],
                setaffinity: Callable[[int, set[int]], None] = os.sched_setaffinity,
                getaffinity: Callable[[int], set[int]] = os.sched_getaffinity) -> dict[int, dict]:
    """Pin each vCPU of ``cpus`` (query-cpus-fast's answer) to ``pinning[index]``; returns
    {vcpu: {"cpu", "thread"}}.  Every planned vCPU must be there, and nothing else."""
    threads = {c["cpu-index"]: c["thread-id"] for c in cpus}
    if sorted(threads) != sorted(pinning):
        raise LaunchError(f"QEMU reports vCPUs {sorted(threads)} but the plan has {sorted(pinning)}; "
                          "not pinning a VM whose vCPUs do not match the plan")
    done = {}
    for vcpu, cpu in sorted(pinning.items()):
        tid = threads[vcpu]
        try:
            setaffinity(tid, {cpu})
            got = getaffinity(tid)
        except OSError as e:
            raise LaunchError(f"pinning vCPU {vcpu} (thread {tid}) to CPU {cpu} failed: {e.strerror}") from e
        if got != {cpu}:
            raise LaunchError(f"vCPU {vcpu} (thread {tid}) runs on CPUs {sorted(got)} after pinning it to CPU {cpu} "
                              "(a cpuset confines QEMU?); run the VM outside that cgroup")
        done[vcpu] = {"cpu": cpu, "thread": tid}
    return done


async def _pin_and_go(socket: Path, pinning: dict[int, int], timeout: float) -> dict[int, dict]:
    from qemu.qmp import QMPClient  # imported here: only a real launch needs it

    qmp = QMPClient("coreslice-vm")
    try:
        await asyncio.wait_for(qmp.connect(str(socket)), timeout)
        cpus = await qmp.execute("query-cpus-fast")
        done = pin_threads(list(cpus), pinning)
        await qmp.execute("cont")
        return done
    finally:
        await qmp.disconnect()


def pin_and_continue(socket: Path, pinning: dict[int, int], timeout: float = 30.0) -> dict[int, dict]:
    """Connect to a paused QEMU's QMP socket, pin its vCPU threads, let it run."""
    from qemu.qmp import QMPError  # the base of the library's connect and execute errors

    try:
        return asyncio.run(_pin_and_go(socket, pinning, timeout))
    except (OSError, asyncio.TimeoutError) as e:
        raise LaunchError(f"QMP on {socket} did not answer ({e or type(e).__name__})") from e
    except QMPError as e:
        raise LaunchError(f"QMP on {socket}: {type(e).__name__}: {e}") from e
