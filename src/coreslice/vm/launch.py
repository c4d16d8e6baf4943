"""Running a planned comparison VM, and undoing everything it took when it ends.

In order: huge pages reserved on the node, PCI functions bound to vfio-pci, QEMU started paused
(-S), its vCPU threads pinned (vm/qmp.py), the guest let run; then, however the VM ends (the
guest powers off, QEMU fails, the user presses Ctrl-C or the launcher gets SIGTERM), QEMU is
stopped, the functions go back to their host drivers and the huge pages back to the pool, last
taken first.  Side effects sit behind ``Sysfs*`` objects, ``popen`` and ``pin`` so that unit tests
run the same sequence against fakes.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from coreslice.errors import LaunchError
from coreslice.vm import hugepages as hp
from coreslice.vm.plan import VmPlan
from coreslice.vm.qmp import pin_and_continue
from coreslice.vm.vfio import SysfsVfio

SOCKET_WAIT_S = 30.0   # QEMU creates its QMP socket before preallocating guest RAM
STOP_WAIT_S = 30.0     # SIGTERM makes QEMU shut down at once; SIGKILL after this
PID_FILE = "qemu.pid"


@dataclass
class VmRun:
    """What a VM run did, for the CLI's report (--json) and for the cleanup."""

    name: str
    pid: int | None = None
    exit_code: int | None = None
    pinned: dict[int, dict] = field(default_factory=dict)
    hugepages: dict | None = None
    devices: dict[str, dict] = field(default_factory=dict)
    ended_by: str = ""          # "guest" (QEMU exited on its own), "signal NAME", "error"
    qemu_log: Path | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "pid": self.pid, "exit_code": self.exit_code,
                "pinning": {str(v): p for v, p in self.pinned.items()}, "hugepages": self.hugepages,
                "devices": self.devices, "ended_by": self.ended_by,
                "qemu_log": str(self.qemu_log) if self.qemu_log else None}


class _Stop(Exception):
    def __init__(self, signum: int):
        self.signum = signum


def _tail(path: Path, n: int = 5) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def _wait_socket(proc, socket: Path, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not socket.exists():
        if proc.poll() is not None:
            raise LaunchError(f"QEMU exited with {proc.returncode} before opening QMP: {_tail(log) or 'no output'} "
                              f"(all of it in {log})")
        if time.monotonic() > deadline:
            raise LaunchError(f"QEMU opened no QMP socket {socket} within {timeout:.0f} s; see {log}")
        time.sleep(0.05)


def _stop_qemu(proc) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_vm(plan: VmPlan, name: str, *, devices_groups: dict[str, int], root: Path = Path("/"),
           run_dir: Path, progress: Callable[[str], None] = lambda s: None,
           popen=subprocess.Popen, pin=pin_and_continue, vfio=None) -> VmRun:
    """Run the VM of ``plan`` until it ends; everything taken is given back before returning."""
    vfio = vfio or SysfsVfio(root)
    run = VmRun(name, qemu_log=run_dir / "qemu.log")
    run_dir.mkdir(parents=True, exist_ok=True)
    plan.serial_log.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        plan.qmp_socket.unlink()  # a socket left by an earlier run would be taken for this one's

    def on_signal(signum, _frame):
        raise _Stop(signum)

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    undo = contextlib.ExitStack()
    try:
        if plan.hugepages is not None:
            h = plan.hugepages
            progress(f"reserving {h.count} x {h.size} huge pages on node {h.node}")
            res = hp.reserve(root, h)
            undo.callback(res.release)
            run.hugepages = {**h.to_json(), **res.to_json()}
        for addr, group in devices_groups.items():
            progress(f"binding {addr} (IOMMU group {group}) to vfio-pci")
            old = vfio.bind(addr, group)
            run.devices[addr] = {"iommu_group": group, "host_driver": old, "returned_to": None}

            def give_back(addr=addr, old=old):
                run.devices[addr]["returned_to"] = vfio.unbind(addr, old)
            undo.callback(give_back)
        with open(run.qemu_log, "wb") as log:
            proc = popen(plan.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)  # Ctrl-C reaches the launcher, which stops QEMU
        run.pid = proc.pid
        pid_file = run_dir / PID_FILE  # how a second launch of the same name finds this one
        pid_file.write_text(f"{proc.pid}\n")
        undo.callback(pid_file.unlink, missing_ok=True)
        undo.callback(_stop_qemu, proc)
        progress(f"QEMU pid {proc.pid} started paused; pinning its vCPUs")
        _wait_socket(proc, plan.qmp_socket, run.qemu_log, SOCKET_WAIT_S)
        run.pinned = pin(plan.qmp_socket, plan.pinning)
        progress("vCPUs pinned ("
                 + ", ".join(f"vCPU {v} -> CPU {p['cpu']}" for v, p in sorted(run.pinned.items()))
                 + f"); the guest runs, its console goes to {plan.serial_log}")
        try:
            run.exit_code = proc.wait()
            run.ended_by = "guest"
        except _Stop as s:
            run.ended_by = f"signal {signal.Signals(s.signum).name}"
            progress(f"{run.ended_by}: stopping QEMU")
            _stop_qemu(proc)
            run.exit_code = proc.returncode
        progress(f"QEMU exited with {run.exit_code}; giving back what the VM took")
    except _Stop as s:
        run.ended_by = f"signal {signal.Signals(s.signum).name}"
        raise LaunchError(f"stopped by {run.ended_by} while starting the VM; everything it took was given back") \
            from None
    finally:
        # Undo with the signals held off: a second Ctrl-C must not leave a function on vfio-pci.
        for sig in old_handlers:
            signal.signal(sig, signal.SIG_IGN)
        try:
            undo.close()
            with contextlib.suppress(FileNotFoundError):
                plan.qmp_socket.unlink()
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
    return run
