"""One class that owns one QEMU process, and a whole-machine boot timer.

Modelled on QEMU's ``python/qemu/machine/machine.py``: the command line is built in one place
(:func:`build_command`, pure, unit-tested), the machine is launched, waited for with timeouts
and always torn down in ``__exit__`` (SIGTERM -- QEMU's graceful quit --, then SIGKILL, both by
the PID it started), and its console logs stay on disk for the post-mortem.

The emulated machine (DESIGN.md section 3): q35 under TCG, host console on COM1 (ttyS0, 0x3f8)
logged to a file, and free consoles for slices, each logged to its own file:

==========  =================  =====  ===============================================
name        device             irq    slice ``--console``
==========  =================  =====  ===============================================
com2        isa-serial 0x2f8   3      ``io:0x2f8``
com3        isa-serial 0x3e8   4      ``io:0x3e8``
com4        isa-serial 0x2e8   3      ``io:0x2e8``
pci         pci-serial         INTx   PCI 16550 (class 0x0700xx, I/O BAR) at 0000:00:10.0
pxb1..3     pci-serial behind  INTx   0000:21:00.0, 0000:41:00.0, 0000:61:00.0, each on
            its own root bus          its own root bus 0000:20 / 0000:40 / 0000:60
==========  =================  =====  ===============================================

The pxb UARTs model the prototype's hardware, where each slice console sits on a PCI root
complex of its own that the slice's DSDT can expose alone.  QEMU 10 plugs only bridges into a
``pxb-pcie`` ("Only PCI/PCIe bridges can be plugged into pxb-pcie"; ``pxb`` refuses a PCIe bus),
so each root bus N holds a ``pcie-root-port`` at N:00.0 and the UART sits at (N+1):00.0.
SeaBIOS assigns the windows (QEMU's DSDT then reports them in each pxb's _CRS); they depend
on the machine's size, so read them from the host, never hard-code them.  With ``-m 6G`` the
6.12 host logs for root bus 0000:20 (pxb1: a 0x060000 host bridge at 0000:00:11.0)::

    root bus resource [io  0xe000-0xefff window]         UART BAR0 0xe000-0xe007
    root bus resource [mem 0xfe800000-0xfe9fffff window]
    root bus resource [mem 0xfea03000-0xfea03fff window]  (the root port's own BAR)
    root bus resource [mem 0xc040000000-0xc05fffffff window]  (64-bit prefetchable)
    root bus resource [bus 20-21]

(pxb2: io 0xd000, pxb3: io 0xc000; with ``-m 2G`` the prefetchable window lies below 4G and
the I/O windows shift with the device count), and bus 0000:00 shrinks to [bus 00-1f].  The
host binds pcieport to each root port and serial to each UART.

x2APIC mode adds ``-device intel-iommu,intremap=on,eim=on``: the host kernel enables x2APIC only
with interrupt remapping, and its command line carries ``intel_iommu=off`` but not
``intremap=off``.  The xAPIC machine has no IOMMU, unless ``--iommu`` adds
``-device intel-iommu,intremap=off`` (DMA remapping only; the host gets ``intel_iommu=on
intremap=off``; see testbed/dmaprobe.py), which x2APIC mode cannot have.

One emulated machine at a time: :meth:`QemuMachine.launch` takes an exclusive ``flock`` on
``$CORESLICE_CACHE/qemu.lock`` (:func:`machine_lock_path`) before it starts QEMU and holds it
for the life of the process (QEMU inherits the descriptor, so the lock goes only when QEMU is
gone).  Two TCG machines on this 2-core build machine starve each other's vCPU and main-loop
threads; under that contention a slice CPU (and once the emulated host's only CPU) lost its
local APIC timer for good (RCU "timer wakeup didn't happen ... Possible timer handling issue",
the CPU idle in HLT), which runs alone or beside a CPU hog never showed.  A launch that finds
the lock held waits, saying who holds it, up to ``$CORESLICE_QEMU_LOCK_WAIT`` seconds (default
1800), then fails with a :class:`ToolError`.  ``CORESLICE_QEMU_LOCK`` names another lock file,
or ``off`` to run machines side by side on purpose.  Only a real ``qemu-system-*`` binary
takes the lock (a stand-in script in a unit test does not).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from coreslice.testbed.paths import cache_root
from coreslice.testbed.report import find_report
from coreslice.testbed.topology import (  # noqa: F401  (the machine's names, for callers)
    PCI_SERIAL_ADDRESS, QEMU, MachineConfig, SerialPort, Share, build_command, check_size, host_append,
    numa_args, size_bytes, slice_serial_ports,
)
from coreslice.testbed.tools import ToolError, format_command, progress

PID_FILE = "qemu.pid"  # in the machine's work directory, written at launch

LOCK_ENV = "CORESLICE_QEMU_LOCK"  # lock file path, or "off"
LOCK_WAIT_ENV = "CORESLICE_QEMU_LOCK_WAIT"  # seconds a launch waits for the lock
LOCK_FILE = "qemu.lock"  # under the cache root
DEFAULT_LOCK_WAIT = 1800.0
_LOCK_POLL = 0.5  # seconds between attempts while another machine runs


def machine_lock_path() -> Path | None:
    """The lock that keeps emulated machines one at a time; None when ``CORESLICE_QEMU_LOCK=off``."""
    value = os.environ.get(LOCK_ENV, "").strip()
    if value.lower() in ("off", "none", "0", "no"):
        return None
    return Path(value).expanduser() if value else cache_root() / LOCK_FILE


def _lock_wait_seconds() -> float:
    value = os.environ.get(LOCK_WAIT_ENV, "").strip()
    if not value:
        return DEFAULT_LOCK_WAIT
    try:
        seconds = float(value)
    except ValueError:
        raise ToolError(f"{LOCK_WAIT_ENV}={value!r}: not a number of seconds; "
                        f"unset it or give e.g. {int(DEFAULT_LOCK_WAIT)}") from None
    return max(0.0, seconds)


class MachineLock:
    """An exclusive ``flock`` on one file, held while an emulated machine runs.

    The holder's PID and run directory are written into the file, so a waiting launch can say
    which machine it waits for.  The lock belongs to the open file description: QEMU, started
    with the descriptor in ``pass_fds``, keeps it until it exits, even if this process dies."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None

    def holder(self) -> str:
        try:
            text = self.path.read_text(errors="replace").strip()
        except OSError:
            return ""
        return text.splitlines()[0] if text else ""

    def acquire(self, wait: float, owner: str) -> None:
        """Take the lock, waiting up to ``wait`` seconds; ToolError if it stays held."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ToolError(f"{self.path}: cannot open the emulated-machine lock: {exc}; "
                            f"fix it or set {LOCK_ENV} to another file") from exc
        start = time.monotonic()
        told = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                waited = time.monotonic() - start
                holder = self.holder() or "unknown holder"
                if waited >= wait:
                    raise ToolError(
                        f"another emulated machine still runs after {waited:.0f} s of waiting "
                        f"({holder}; lock {self.path}): two QEMU machines at once on this host "
                        f"starve each other (lost APIC timer interrupts); wait for it to end, "
                        f"raise {LOCK_WAIT_ENV}, or set {LOCK_ENV}=off to run both anyway"
                    )
                if not told:
                    progress(f"waiting for another emulated machine to end ({holder}; lock {self.path})")
                    told = True
                time.sleep(min(_LOCK_POLL, max(0.0, wait - waited)))
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{owner}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        """Drop this process's hold (QEMU's inherited copy goes when QEMU exits)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    @property
    def held(self) -> bool:
        return self.fd is not None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """PR_SET_PDEATHSIG(SIGKILL): QEMU dies if this process dies without tearing down."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


# PIDs of QEMU processes launched by this Python process and not yet reaped; tests check it
# is empty after each test (and kill what is left, by PID).
LIVE_PIDS: set[int] = set()


class QemuMachine:
    """Owns one QEMU process.  Use as a context manager; teardown always runs."""

    def __init__(self, config: MachineConfig, workdir: Path) -> None:
        self.config = config
        self.workdir = Path(workdir)
        self.console_log = self.workdir / "console-host.log"
        # With NUMA nodes and no explicit placement, spread the pxb root buses over the nodes
        # (pxb1 on node 0, pxb2 on node 1, ...), so each node has a console of its own.
        nodes = config.pxb_numa_nodes or tuple(range(config.numa))
        self.serial_ports = slice_serial_ports(self.workdir, nodes) if config.slice_consoles else []
        self.stderr_log = self.workdir / "qemu-stderr.log"
        self._proc: subprocess.Popen | None = None
        self.launched_at: float | None = None  # time.monotonic()
        self.launched_wall: float | None = None  # time.time()
        self.exit_code: int | None = None
        self._lock: MachineLock | None = None
        # The human monitor, for post-mortems of a slice that stops answering (`info lapic`):
        # a short path, since unix socket paths end at 108 bytes and run dirs can be longer.
        self.monitor_path = Path(tempfile.gettempdir()) / f"coreslice-mon-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"

    # -- command line -------------------------------------------------------------------------
    def command(self) -> list[str]:
        return build_command(self.config, self.console_log, self.serial_ports)

    def command_line(self) -> str:
        return format_command(self.command())

    @property
    def pci_serial(self) -> SerialPort | None:
        """The PCI UART on bus 0 (0000:00:10.0)."""
        return next((p for p in self.serial_ports if p.kind == "pci"), None)

    @property
    def pxb_serials(self) -> list[SerialPort]:
        """The PCI UARTs on their own root buses, one per slice console."""
        return [p for p in self.serial_ports if p.kind == "pxb"]

    # -- life cycle ---------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _takes_lock(self) -> bool:
        return Path(self.config.qemu_binary).name.startswith("qemu-system-")

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def launch(self) -> None:
        if self._proc is not None:
            raise RuntimeError("QemuMachine.launch: already launched")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [*self.command(), "-monitor", f"unix:{self.monitor_path},server=on,wait=off"]
        lock_path = machine_lock_path() if self._takes_lock() else None
        if lock_path is not None:
            lock = MachineLock(lock_path)
            lock.acquire(_lock_wait_seconds(), f"pid {os.getpid()} run dir {self.workdir}")
            self._lock = lock
        try:
            self._start(cmd)
        except BaseException:
            self._release_lock()
            raise

    def _start(self, cmd: list[str]) -> None:
        for log in [self.console_log, *(p.log for p in self.serial_ports)]:
            log.write_bytes(b"")
        (self.workdir / "qemu-command.txt").write_text(format_command(cmd) + "\n")
        progress(f"$ {format_command(cmd)}")
        try:
            stderr = open(self.stderr_log, "wb")
        except OSError as exc:
            raise ToolError(f"{self.stderr_log}: {exc}") from exc
        # QEMU inherits the machine lock's descriptor: the lock lasts as long as QEMU does.
        lock_fds = (self._lock.fd,) if self._lock is not None and self._lock.fd is not None else ()
        try:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                start_new_session=True, preexec_fn=_die_with_parent, pass_fds=lock_fds,
            )
        except FileNotFoundError as exc:
            raise ToolError(
                f"{cmd[0]}: not found; install it with scripts/install-system-deps.sh"
            ) from exc
        finally:
            stderr.close()
        LIVE_PIDS.add(self._proc.pid)
        # For whoever started this process (tests, scripts): stop QEMU by its PID if we die.
        (self.workdir / PID_FILE).write_text(f"{self._proc.pid}\n")
        self.launched_at = time.monotonic()
        self.launched_wall = time.time()

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def poll(self) -> int | None:
        if self._proc is None:
            return None
        rc = self._proc.poll()
        if rc is not None:
            self.exit_code = rc
            LIVE_PIDS.discard(self._proc.pid)
            self._release_lock()
        return rc

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for QEMU to exit; its exit code, or None if still running after ``timeout``."""
        if self._proc is None:
            return self.exit_code
        try:
            self.exit_code = self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        LIVE_PIDS.discard(self._proc.pid)
        self._release_lock()
        return self.exit_code

    def shutdown(self, grace: float = 5.0) -> int | None:
        """Stop QEMU if it still runs: SIGTERM (QEMU quits cleanly), then SIGKILL, by PID."""
        proc = self._proc
        if proc is None:
            self._release_lock()
            return self.exit_code
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=30)
        self.exit_code = proc.returncode
        LIVE_PIDS.discard(proc.pid)
        self._release_lock()
        with contextlib.suppress(OSError):
            self.monitor_path.unlink()
        return self.exit_code

    def hmp(self, command: str, timeout: float = 10.0) -> str:
        """Run one human-monitor command (e.g. ``info lapic 2``) in the running QEMU; its output."""
        prompt = b"(qemu) "
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.monitor_path))
            buf = b""
            while not buf.endswith(prompt):  # the banner, then the first prompt
                chunk = sock.recv(65536)
                if not chunk:
                    raise ToolError("QEMU monitor closed before its prompt")
                buf += chunk
            sock.sendall(command.encode() + b"\n")
            buf = b""
            while not buf.endswith(prompt):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
        text = buf.decode(errors="replace").replace("\r", "")
        text = text.removesuffix(prompt.decode())
        # The monitor echoes the command line (with terminal escapes) before the output.
        lines = text.split("\n")
        return "\n".join(lines[1:]).strip() + "\n" if len(lines) > 1 else text

    def qemu_stderr(self) -> str:
        try:
            return self.stderr_log.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> "QemuMachine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


class LogFollower:
    """Reads complete new lines from a file that another process appends to."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._offset = 0
        self._partial = b""
        self.lines: list[str] = []

    def poll(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        if not data:
            return []
        self._offset += len(data)
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        new = [c.decode(errors="replace").rstrip("\r") for c in complete]
        self.lines.extend(new)
        return new


@dataclass
class WholeBoot:
    seconds: float | None  # QEMU launch to the report line; None if it never came
    report: dict | None
    console_log: Path
    command: str


def boot_whole_machine(
    kernel: Path,
    initrd: Path,
    workdir: Path,
    *,
    smp: int = 2,
    memory: str = "1G",
    cpu_model: str = "max",
    append_extra: str = "",
    timeout: float = 180.0,
) -> WholeBoot:
    """Boot ``kernel`` + ``initrd`` (the slice initramfs) as a whole QEMU machine and time it
    from QEMU launch to the ``CORESLICE-REPORT`` line on ttyS0 (the baseline that a slice boot
    is compared with).  QEMU is always stopped before returning."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    append = f"console=ttyS0,115200 panic=-1 {append_extra}".strip()
    cfg = MachineConfig(
        kernel=kernel, initrd=initrd, append=append, smp=smp, memory=memory,
        cpu_model=cpu_model, slice_consoles=False, name="coreslice-whole",
    )
    with QemuMachine(cfg, workdir) as m:
        m.launch()
        follower = LogFollower(m.console_log)
        deadline = m.launched_at + timeout  # type: ignore[operator]
        while time.monotonic() < deadline:
            for line in follower.poll():
                report = find_report(line)
                if report is not None:
                    return WholeBoot(time.monotonic() - m.launched_at, report, m.console_log,
                                     m.command_line())
            if m.poll() is not None:
                break
            time.sleep(0.05)
    return WholeBoot(None, None, m.console_log, m.command_line())
