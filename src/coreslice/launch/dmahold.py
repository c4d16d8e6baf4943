"""A slice's DMA domain: its PCI functions confined by the host's IOMMU to the slice's own RAM.

When the host's IOMMU translates (``host configure --iommu on``: intel_iommu=on, intremap=off),
a function the host has let go of sits in the host's default DMA domain, which maps nothing of
the slice: every DMA of the slice's driver would fault.  Each launch therefore gives its
functions one VFIO type1 domain (machine/vfio.py) that maps exactly the slice's RAM at IOVA =
physical address, which is what the slice's kernel (which sees no IOMMU) programs into its
devices.  A DMA anywhere else (the host's memory, another slice's) faults in the IOMMU and the
host logs it.

The domain lives as long as the container's file descriptor, so a process must hold it for
the slice's whole life: ``coreslice dma-hold`` (this module's :func:`hold_main`), started by the
launch after the functions are detached and before the slice's CPUs get their INIT, under
systemd when it runs (``systemd-run``, unit ``coreslice-dma-NAME``), else as a detached process.
It binds the functions to vfio-pci, builds the domain, writes its state file
(``/run/coreslice/dma/NAME.json``) and waits for SIGTERM; then it closes the device fds (vfio-pci
resets the functions and turns bus mastering off), drops the domain and leaves the functions
unbound with driver_override ``coreslice`` (as a launch leaves them).  ``stop`` and a relaunch
end it after the functions went quiet.  If the holder dies, the functions fall back to the
default domain: the slice's DMA then faults, which is safe, and ``coreslice status`` says so.

Interrupts: with remapping off, the devices' MSIs are compatibility format and reach the
slice's CPUs untranslated (VT-d 4.x §5.1: requests to 0xFEEx_xxxx are interrupts, not DMA).
VFIO's type1 backend refuses such a platform unless ``allow_unsafe_interrupts`` is set (a
device could then send MSIs to any CPU, the host's included: the IOMMU confines DMA, not
interrupts); the holder sets it, and says so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from coreslice.errors import LaunchError, UsageError
from coreslice.ledger import pid_alive

Progress = Callable[[str], None]
VFIO_PCI = "vfio-pci"
OVERRIDE = "coreslice"  # machine/pci.py's: what a slice's function keeps while no one binds it
RUN_DIR_ENV = "CORESLICE_RUN_DIR"
READY_TIMEOUT = 120.0  # the map walks every page of the slice's RAM: seconds under TCG
STOP_TIMEOUT = 30.0
UNSAFE_INTERRUPTS = "sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts"
# Drivers that leave a group's DMA alone (host/pci.py GROUP_NEUTRAL_DRIVERS, plus vfio-pci).
NEUTRAL = ("pcieport", "pci-stub", VFIO_PCI, "shpchp")


def run_dir() -> Path:
    return Path(os.environ.get(RUN_DIR_ENV, "/run/coreslice")) / "dma"


def state_path(name: str) -> Path:
    return run_dir() / f"{name}.json"


@dataclass(frozen=True)
class Range:
    base: int
    size: int

    def arg(self) -> str:
        return f"0x{self.base:x}:0x{self.size:x}"

    @staticmethod
    def parse(text: str) -> "Range":
        try:
            base, size = (int(p, 0) for p in text.split(":"))
        except ValueError:
            raise UsageError(f"--range {text!r}: give BASE:SIZE, e.g. 0x80000000:0x40000000") from None
        if base % 0x1000 or size % 0x1000 or size <= 0:
            raise UsageError(f"--range {text}: base and size must be multiples of 4 KiB")
        return Range(base, size)


# -- checks (no effect) -------------------------------------------------------------------------

def host_translates(root: Path = Path("/")) -> bool:
    """The host's IOMMU translates DMA: the kernel made IOMMU groups (intel_iommu=on)."""
    groups = root / "sys/kernel/iommu_groups"
    try:
        return groups.is_dir() and any(groups.iterdir())
    except OSError:
        return False


def _driver(root: Path, address: str) -> str | None:
    link = root / "sys/bus/pci/devices" / address / "driver"
    return link.resolve().name if link.exists() else None


def _is_bridge(root: Path, address: str) -> bool:
    try:
        return (root / "sys/bus/pci/devices" / address / "class").read_text().strip().startswith("0x0604")
    except OSError:
        return False


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def groups_for(functions: Sequence[str], root: Path = Path("/")) -> dict[str, int]:
    """Each function's IOMMU group, read from sysfs; UsageError for a function in no group (the
    IOMMU does not cover it: its DMA could not be confined) and for a group shared with an
    endpoint the host drives (VFIO gives a whole group to one user)."""
    mine, out = set(functions), {}
    for fn in functions:
        link = root / "sys/bus/pci/devices" / fn / "iommu_group"
        if not link.exists():
            raise UsageError(f"{fn} is in no IOMMU group although the host's IOMMU translates: its DMA cannot be "
                             "confined to the slice; give the slice functions the IOMMU covers")
        group = int(link.resolve().name)
        gtype = _read(root / "sys/kernel/iommu_groups" / str(group) / "type")  # Linux >= 5.11
        if gtype is not None and gtype not in ("DMA", "DMA-FQ"):
            raise UsageError(f"{fn}: IOMMU group {group} has a default domain of type {gtype} (iommu=pt or "
                             "iommu.passthrough=1?): while no domain of the slice's holds it, the function would "
                             "reach all memory; boot the host without passthrough (coreslice host configure "
                             "--profile slice-host --iommu on)")
        mates = sorted(p.name for p in (root / "sys/kernel/iommu_groups" / str(group) / "devices").iterdir())
        busy = [f"{m} ({d})" for m in mates if m not in mine and not _is_bridge(root, m)
                and (d := _driver(root, m)) is not None and d not in NEUTRAL]
        if busy:
            raise UsageError(f"{fn} shares IOMMU group {group} with {', '.join(busy)}, which the host drives: one "
                             "IOMMU domain serves the whole group, so the slice's DMA could not be kept from the "
                             "host's; give the slice every endpoint of the group, or a function in a group of its own")
        out[fn] = group
    return out


# -- the holder process ---------------------------------------------------------------------------

def _sysfs_write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise LaunchError(f"writing {value.strip()!r} to {path}: {e.strerror}") from e


def bind_vfio(address: str, root: Path) -> None:
    dev = root / "sys/bus/pci/devices" / address
    _sysfs_write(dev / "driver_override", VFIO_PCI)
    old = _driver(root, address)
    if old == VFIO_PCI:
        return
    if old is not None:
        _sysfs_write(dev / "driver/unbind", address)
    _sysfs_write(root / "sys/bus/pci/drivers" / VFIO_PCI / "bind", address)


def unbind_vfio(address: str, root: Path) -> None:
    """Back to no driver, override ``coreslice`` first (no window for a host driver)."""
    dev = root / "sys/bus/pci/devices" / address
    if not dev.exists():
        return
    _sysfs_write(dev / "driver_override", OVERRIDE)
    if _driver(root, address) == VFIO_PCI:
        _sysfs_write(dev / "driver/unbind", address)


def _modprobe(module: str, root: Path) -> None:
    if root != Path("/"):
        return
    proc = subprocess.run(["modprobe", module], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LaunchError(f"modprobe {module}: {proc.stderr.strip() or 'failed'}; install the host kernel's "
                          "modules (vfio-pci is in linux-image-*)")


def ensure_vfio(root: Path, notes: list[str]) -> str | None:
    """vfio-pci and type1 loaded, type1 accepting a platform without interrupt remapping; the
    parameter's old value when it was changed (for a failed build to put back), else None."""
    if not (root / "sys/bus/pci/drivers" / VFIO_PCI).is_dir():
        _modprobe(VFIO_PCI, root)
    if not (root / UNSAFE_INTERRUPTS).exists():
        _modprobe("vfio_iommu_type1", root)
    p = root / UNSAFE_INTERRUPTS
    if p.exists() and p.read_text().strip() not in ("Y", "1"):
        old = p.read_text().strip()
        _sysfs_write(p, "1")
        notes.append("set vfio_iommu_type1 allow_unsafe_interrupts=1: interrupt remapping is off (the slices' "
                     "MSIs need it off), so the IOMMU confines DMA but not interrupts")
        return old
    return None


def build_domain(functions: Sequence[str], ranges: Sequence[Range], root: Path = Path("/"),
                 container=None, notes: list[str] | None = None):
    """Bind, build and map; on failure undo what was done and raise.  Returns the container."""
    from coreslice.machine.vfio import Container

    notes = notes if notes is not None else []
    groups = groups_for(functions, root)
    unsafe_was = ensure_vfio(root, notes)
    bound: list[str] = []
    c = container or Container(dev=str(root / "dev"))
    try:
        for fn in functions:
            bind_vfio(fn, root)
            bound.append(fn)
        c.open()
        for g in dict.fromkeys(groups.values()):
            c.add_group(g)
        c.set_iommu()
        for r in ranges:
            c.map_physical(r.base, r.size, devmem=str(root / "dev/mem"))
        for fn in functions:
            c.open_device(groups[fn], fn)
    except BaseException:
        c.close()
        for fn in reversed(bound):
            try:
                unbind_vfio(fn, root)
            except LaunchError:
                pass
        if unsafe_was is not None:  # a host-wide setting: as it was, since no domain needs it now
            try:
                _sysfs_write(root / UNSAFE_INTERRUPTS, "0" if unsafe_was in ("N", "0") else unsafe_was)
            except LaunchError:
                pass
        raise
    return c


def _write_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(state) + "\n")
    os.replace(tmp, path)


def hold_main(name: str, functions: Sequence[str], ranges: Sequence[Range], root: Path = Path("/")) -> int:
    """``coreslice dma-hold``: build the domain, say so in the state file, hold it until SIGTERM."""
    path = state_path(name)
    # Blocked from the start and taken with sigwait: a SIGTERM during the build waits for it, and
    # none can slip between a check and a pause.
    stops = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    notes: list[str] = []
    base = {"name": name, "pid": os.getpid(), "functions": list(functions),
            "ranges": [{"base": r.base, "size": r.size} for r in ranges]}
    try:
        c = build_domain(functions, ranges, root, notes=notes)
    except Exception as e:  # noqa: BLE001 - whatever it is, the launcher must hear of it at once
        _write_state(path, {**base, "ready": False, "error": str(e) or type(e).__name__})
        print(f"coreslice dma-hold: {e}", file=sys.stderr)
        return 1
    _write_state(path, {**base, "ready": True, "groups": sorted(c.groups), "notes": notes})
    signal.sigwait(stops)
    c.close()
    failed = unbind_all(functions, root)
    path.unlink(missing_ok=True)
    if failed:
        print(f"coreslice dma-hold: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def unbind_all(functions: Sequence[str], root: Path = Path("/")) -> list[str]:
    """Every function off vfio-pci (safe only once no holder has its device fd open)."""
    failed = []
    for fn in functions:
        try:
            unbind_vfio(fn, root)
        except LaunchError as e:
            failed.append(str(e))
    return failed


# -- the launcher's side ----------------------------------------------------------------------------

def read_state(name: str) -> dict | None:
    try:
        return json.loads(state_path(name).read_text())
    except (OSError, ValueError):
        return None


def holder_alive(state: dict | None) -> bool:
    """The state's pid is alive and is the dma-hold of that slice (not a reused pid)."""
    if not state or not pid_alive(state.get("pid")):
        return False
    try:
        argv = Path(f"/proc/{state['pid']}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    name = str(state.get("name", "")).encode()
    return b"dma-hold" in argv and any(a == b"--name" and b == name for a, b in zip(argv, argv[1:]))


def _command(name: str, functions: Sequence[str], ranges: Sequence[Range]) -> list[str]:
    cmd = [sys.executable, "-m", "coreslice", "dma-hold", "--name", name]
    for fn in functions:
        cmd += ["--function", fn]
    for r in ranges:
        cmd += ["--range", r.arg()]
    return cmd


def ready_timeout(ranges: Sequence[Range]) -> float:
    """type1 walks a PFNMAP range a page per call before Linux 6.15: allow for large slices."""
    return READY_TIMEOUT + 60.0 * sum(r.size for r in ranges) / (1 << 30)


def start(name: str, functions: Sequence[str], ranges: Sequence[Range], progress: Progress = lambda _m: None,
          timeout: float | None = None) -> dict:
    """Start the holder and wait until its domain is in place; LaunchError (with the holder's
    reason) when it fails or does not get there in time, after ending it and unbinding the
    functions again, so that the launch's undo finds them as it left them."""
    timeout = ready_timeout(ranges) if timeout is None else timeout
    path = state_path(name)
    old = read_state(name)
    if holder_alive(old):
        raise LaunchError(f"a DMA holder for '{name}' (pid {old['pid']}) still runs; coreslice stop {name} first, "  # type: ignore[index]
                          f"or end it (kill {old['pid']})")  # type: ignore[index]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    cmd = _command(name, functions, ranges)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    log = path.with_suffix(".log")
    progress(f"confining the DMA of {', '.join(functions)} to the slice's RAM "
             f"({', '.join(r.arg() for r in ranges)}) in an IOMMU domain")
    unit = child = None
    if Path("/run/systemd/system").is_dir():
        unit = f"coreslice-dma-{name}.service"
        subprocess.run(["systemctl", "reset-failed", unit], capture_output=True)
        proc = subprocess.run(["systemd-run", "--quiet", f"--unit={unit}", "--collect",
                               f"--setenv=PYTHONPATH={env['PYTHONPATH']}",
                               f"--setenv={RUN_DIR_ENV}={run_dir().parent}", "--", *cmd],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise LaunchError(f"systemd-run {unit}: {proc.stderr.strip() or 'failed'}")
    else:
        with open(log, "w") as out:
            child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                     start_new_session=True, close_fds=True)
    deadline, next_unit_check = time.monotonic() + timeout, 0.0
    why = None
    while why is None:
        state = read_state(name)
        if state is not None:
            if state.get("ready"):
                return state
            why = state.get("error", "failed")
        elif child is not None and child.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            why = f"the holder exited ({child.returncode}) before its domain was in place" + (f": {tail[0]}" if tail else "")
        elif unit is not None and time.monotonic() >= next_unit_check:
            next_unit_check = time.monotonic() + 1.0
            active = subprocess.run(["systemctl", "is-active", unit], capture_output=True, text=True).stdout.strip()
            if active in ("failed", "inactive"):
                why = f"unit {unit} is {active} before its domain was in place (journalctl -u {unit})"
        elif time.monotonic() > deadline:
            why = f"the holder did not build its domain within {timeout:g} s"
        if why is None:
            time.sleep(0.05)
    _end_failed_start(unit, child)
    unbind_all(functions)
    path.unlink(missing_ok=True)
    raise LaunchError(f"DMA domain for '{name}': {why}")


def _end_failed_start(unit: str | None, child: subprocess.Popen | None) -> None:
    if unit is not None:
        subprocess.run(["systemctl", "stop", unit], capture_output=True, timeout=STOP_TIMEOUT)
    if child is not None and child.poll() is None:
        child.kill()
        child.wait(timeout=STOP_TIMEOUT)


def release(name: str, timeout: float = STOP_TIMEOUT) -> str | None:
    """End the holder of ``name`` (its domain goes, its functions are reset and unbound); what
    was done in words, None when there was none.  LaunchError when the holder outlives even a
    SIGKILL: unbinding its functions then would block in the kernel."""
    state = read_state(name)
    if state is None:
        return None
    fns = state.get("functions", [])
    if not holder_alive(state):
        state_path(name).unlink(missing_ok=True)
        unbind_all(fns)  # no fd open: off vfio-pci, as a clean exit leaves them
        return "DMA holder already gone (its domain with it)"
    pid = state["pid"]
    os.kill(pid, signal.SIGTERM)
    if not _gone(pid, timeout):
        os.kill(pid, signal.SIGKILL)  # its fds close with it: the domain goes all the same
        if not _gone(pid, timeout):
            raise LaunchError(f"the DMA holder of '{name}' (pid {pid}) survives SIGKILL; its functions stay on "
                              f"vfio-pci: see its kernel stack (/proc/{pid}/stack)")
        state_path(name).unlink(missing_ok=True)
        unbind_all(fns)
        return f"DMA holder (pid {pid}) killed after {timeout:g} s; its domain is gone"
    state_path(name).unlink(missing_ok=True)
    state_path(name).with_suffix(".log").unlink(missing_ok=True)  # its output, kept for a failed start only
    return f"DMA domain released (holder pid {pid})"


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.05)
    _reap(pid)
    return not pid_alive(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


# -- the narrow interface the launch uses (machine.Machine.dma) ----------------------------------

class RealDma:
    def __init__(self, root: Path = Path("/")):
        self.root = root

    def translates(self) -> bool:
        return host_translates(self.root)

    def check(self, functions: Sequence[str]) -> dict[str, int]:
        return groups_for(functions, self.root)

    def hold(self, name: str, functions: Sequence[str], ranges: Sequence[Range], progress: Progress) -> dict:
        return start(name, functions, ranges, progress)

    def release(self, name: str) -> str | None:
        return release(name)


class FakeDma:
    """Records holds and releases; ``iommu`` says whether the fake host translates."""

    def __init__(self, iommu: bool = False, fail: str | None = None):
        self.iommu, self.fail = iommu, fail
        self.held: dict[str, tuple[list[str], list[Range]]] = {}
        self.log: list[str] = []

    def translates(self) -> bool:
        return self.iommu

    def check(self, functions: Sequence[str]) -> dict[str, int]:
        return {fn: i for i, fn in enumerate(functions)}

    def hold(self, name: str, functions: Sequence[str], ranges: Sequence[Range], progress: Progress) -> dict:
        if self.fail:
            raise LaunchError(self.fail)
        self.held[name] = (list(functions), list(ranges))
        self.log.append(f"hold {name} {','.join(functions)} {' '.join(r.arg() for r in ranges)}")
        return {"ready": True, "pid": 0, "functions": list(functions)}

    def release(self, name: str) -> str | None:
        if self.held.pop(name, None) is None:
            return None
        self.log.append(f"release {name}")
        return "DMA domain released"
