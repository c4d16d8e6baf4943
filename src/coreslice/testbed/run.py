"""``coreslice testbed run``: boot the emulated host, run ``coreslice boot`` for each slice inside
it, watch the slices' consoles for their report line, run host commands, and report.

Flow (outside = this process, inside = the job script in the emulated host)::

    ensure kernel + initramfs ─► run dir (env, job.sh, hostcmd-*.sh) ─► QEMU launch
      inside: job-start, python-ready, [boot-start i, coreslice boot, boot-end i rc]..., slices-launched
      outside: watches events + console logs; when every launched slice reported (or timed
               out) it creates <run>/continue
      inside: interrupts after, host commands, job-end, poweroff
    ─► result dict (printed as JSON with --json)

Times are taken outside, on the wall clock, when an event or report line is first seen
(polled every 50 ms).
"""

from __future__ import annotations

import compileall
import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import coreslice
from coreslice.errors import CoresliceError, UsageError
from coreslice.testbed import apicwatch, audit, guestos
from coreslice.testbed import hostview, initramfs, interrupts, job as jobmod, kernels, ninep, report
from coreslice.testbed.paths import cache_dir
from coreslice.testbed.qemu import (
    LogFollower,
    MachineConfig,
    QemuMachine,
    Share,
    check_size,
    host_append,
)
from coreslice.testbed.topology import check_iommu_apic
from coreslice.testbed import sriov as sriovdevs
from coreslice.testbed import datapath, dmaprobe
from coreslice.testbed.tools import ToolError, progress, read_or_none as _read


@dataclass
class RunOptions:
    slices: list[str] = field(default_factory=list)
    host_cmds: list[str] = field(default_factory=list)
    smp: int = 4
    memory: str = "6G"
    host_mem: str = "1G"
    cpu_model: str = "max"
    x2apic: bool = False
    kernel_version: str | None = None
    timeout: float = 240.0
    slice_timeout: float = 120.0
    workdir: Path | None = None
    host_append_extra: list[str] = field(default_factory=list)
    # What the job runs with the host's Python for each slice (tests substitute a fake loader).
    # Boot each slice only after the previous one reported (or timed out).
    wait_each: bool = False
    # Slices without --console get the PCI UARTs on their own root buses (0000:21:00.0 ...)
    # instead of the ISA ports.  Off until the loader exposes a console's root bus in the
    # slice's DSDT (issue 3 section 2).
    pci_consoles: bool = True
    # NUMA nodes of the emulated machine (0: none, no SRAT); see qemu.numa_args.
    numa: int = 0
    # SR-IOV physical functions for the host (igb NIC, nvme with secondary controllers); testbed/sriov.py.
    sriov: bool = False
    # The slices' data path (testbed/datapath.py): an NVMe controller with an ext4 image and/or
    # a NIC linked to a host NIC, on each slice's own pxb root bus; the host gets its own disk
    # and NIC.
    storage: bool = False
    network: bool = False
    # A real OS on each slice's NVMe (testbed/guestos.py): "debian" or an image out-dir.
    guest_os: str | None = None
    guest_cloud_config: Path | None = None
    guest_ssh_key: Path | None = None  # private key; its .pub beside it
    guest_packages: tuple[str, ...] = ()  # more Debian packages in a --guest-os debian image
    keep_guest_disks: bool = False
    # Record every device access of the slices' CPUs (testbed/audit.py) from the first boot to
    # audit_steady seconds after the last report.
    audit: bool = False
    audit_steady: float = 10.0
    # DMA remapping on the host (testbed/dmaprobe.py): intel-iommu without interrupt remapping,
    # intel_iommu=on intremap=off, VFIO loaded.  Not with x2apic.
    iommu: bool = False
    # An edu DMA engine on each slice's root bus, and the slice's init probing where it can DMA.
    dma_probe: bool = False


def python_for_host() -> tuple[str, str]:
    """(interpreter, PYTHONPATH) for running this working tree's coreslice inside the host."""
    hp = hostview.host_python()
    return hp.interpreter, hp.pythonpath


def _named_files(args) -> list[Path]:
    """Absolute paths that a ``coreslice boot`` argument list names as input files."""
    out = []
    for opt in ("--kernel", "--initrd", "--config"):
        v = jobmod.option_value(args, opt)
        if v and os.path.isabs(v):
            out.append(Path(v))
    v = jobmod.option_value(args, "--image")
    if v and os.path.isabs(v):
        out.append(Path(v) / "image.json")
    return out


KEEP_RUNS = 50
TRACE_FILE = "trace.log"  # QEMU's device-access trace (--audit), in the run directory


def _prune_runs(runs: Path, keep: int = KEEP_RUNS) -> None:
    """Keep the newest ``keep`` run directories of the default location (they are ~200 KB)."""
    old = sorted((d for d in runs.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)[:-keep]
    for d in old:
        shutil.rmtree(d, ignore_errors=True)


def make_run_dir(workdir: Path | None) -> Path:
    if workdir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        runs = cache_dir() / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        _prune_runs(runs)
        d = runs / f"{stamp}-{os.getpid()}"
    else:
        d = Path(workdir).resolve()
        hostview.mount_points([d])  # refuses /proc, /sys, /dev
        if d.exists() and any(d.iterdir()):
            raise UsageError(f"--workdir {d}: not empty; give a new or empty directory")
    d.mkdir(parents=True, exist_ok=True)
    return d


def apic_mode(apic_base: int | None, dmesg: str) -> str:
    """``"x2apic"`` or ``"xapic"``: from IA32_APIC_BASE (bit 10 = x2APIC enable) when it was
    read, else from the host kernel log; ``"unknown"`` if neither says."""
    if apic_base is not None:
        return "x2apic" if apic_base & (1 << 10) else "xapic"
    m = re.findall(r"Switched APIC routing to:?\s*([^\n]+)", dmesg)
    if m:
        return "x2apic" if "x2apic" in m[-1] else "xapic"
    if re.search(r"x2apic enabled|Enabled x2apic", dmesg, re.I):
        return "x2apic"
    if "IRQ remapping doesn't support X2APIC mode" in dmesg:
        return "xapic"
    return "unknown"


_ROOT_BUS_RESOURCE = re.compile(r"pci_bus ([0-9a-f]{4}:[0-9a-f]{2}): root bus resource \[(.+)\]")


def root_bus_resources(dmesg: str) -> dict[str, list[str]]:
    """Root bus -> its windows as the host kernel logged them ("io  0xd000-0xdfff window",
    "bus 20-21"), from "pci_bus 0000:20: root bus resource [...]" lines."""
    out: dict[str, list[str]] = {}
    for m in _ROOT_BUS_RESOURCE.finditer(dmesg):
        out.setdefault(m.group(1), []).append(" ".join(m.group(2).split()))
    return out


def pci_functions(text: str) -> dict[str, dict]:
    """host-pci.txt ("ADDRESS CLASS VENDOR DEVICE DRIVER|-" per line) -> address -> record."""
    out = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 5:
            out[f[0]] = {"class": f[1], "vendor": f[2], "device": f[3], "driver": None if f[4] == "-" else f[4]}
    return out


def _read_int(path: Path) -> int | None:
    t = _read(path)
    try:
        return int(t.strip()) if t is not None else None
    except ValueError:
        return None


class _SliceState:
    def __init__(self, job: jobmod.SliceJob, guest: bool = False) -> None:
        self.job = job
        self.guest = guest  # runs a guest OS: reached over SSH by the host, reports nothing
        self.started: float | None = None  # monotonic
        self.started_wall: float | None = None
        self.started_uptime: float | None = None
        self.ended_uptime: float | None = None
        self.exit_code: int | None = None
        self.report: dict | None = None
        self.report_at: float | None = None
        self.report_log: Path | None = None
        self.released = False  # continue-<i> created (wait_each)
        self.diagnosed = False  # its CPUs' local APIC state saved after it timed out

    def waiting(self, now: float, slice_timeout: float) -> bool:
        """Still expected to report."""
        if self.report is not None or self.exit_code is None or self.exit_code != 0 or self.guest:
            return False
        return self.started is not None and now - self.started < slice_timeout


def _save_lapic_state(run_dir: Path, machine: QemuMachine, s: _SliceState) -> None:
    """A slice that never reported: keep each of its CPUs' local APIC state (QEMU `info lapic`:
    timer count and LVT, IRR/ISR) in lapic-<i>.txt, to tell a lost timer interrupt from a lost
    EOI or a mis-programmed timer."""
    out = run_dir / f"lapic-{s.job.index}.txt"
    try:
        plan = json.loads((run_dir / f"slice-{s.job.index}.stdout").read_text())["plan"]
        apic_ids = [c["apic_id"] for c in plan["cpus"]]
        out.write_text("".join(f"== info lapic {a}\n{machine.hmp(f'info lapic {a}')}" for a in apic_ids))
        progress(f"slice {s.job.index}: no report after {s.started and time.monotonic() - s.started:.0f} s; "
                 f"its CPUs' local APIC state is in {out}")
    except (OSError, ValueError, KeyError, TypeError, ToolError) as exc:
        with contextlib.suppress(OSError):
            out.write_text(f"could not read the local APIC state: {exc}\n")


def _host_cpus(run_dir: Path) -> list[int]:
    """The emulated host's online CPUs (host-cpu-online.txt, written early by the job)."""
    from coreslice.host.sysfs import parse_cpu_list
    try:
        return parse_cpu_list((run_dir / "host-cpu-online.txt").read_text().strip())
    except (OSError, ValueError):
        return []


def _apic_ids_in_use(run_dir: Path, states: list["_SliceState"]) -> list[str]:
    """The host's online CPUs' APIC IDs (host-cpuinfo.txt) and those of every slice launched."""
    ids: list[str] = []
    with contextlib.suppress(OSError):
        ids += re.findall(r"^apicid\s*:\s*(\d+)", (run_dir / "host-cpuinfo.txt").read_text(), re.M)
    for s in states:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            plan = json.loads((run_dir / f"slice-{s.job.index}.stdout").read_text())["plan"]
            ids += [str(c["apic_id"]) for c in plan["cpus"]]
    return list(dict.fromkeys(ids))


def _save_postmortem(run_dir: Path, machine: QemuMachine, label: str, apic_ids: list[str],
                     extra: tuple[str, ...] = ()) -> None:
    """A host command asked for it (event ``postmortem LABEL APIC...``): keep every vCPU's
    registers (``info registers -a``: RIP, RFLAGS.IF, CR8) and the named CPUs' local APIC state in
    postmortem-LABEL.txt, then create postmortem-LABEL.done, which the command waits for, so the
    state is read while the slice is still stuck rather than after a restart INITs it."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", label)[:64] or "x"
    out = run_dir / f"postmortem-{name}.txt"
    parts = []
    for cmd in ["info registers -a", *extra] + [f"info lapic {a}" for a in apic_ids if a.isdigit()]:
        try:
            parts.append(f"== {cmd}\n{machine.hmp(cmd, timeout=30)}")
        except (OSError, ToolError) as exc:
            parts.append(f"== {cmd}\nfailed: {exc}\n")
    out.write_text("".join(parts))
    (run_dir / f"postmortem-{name}.done").write_text("")
    progress(f"post-mortem '{label}' (APIC IDs {' '.join(apic_ids) or '-'}) saved in {out}")


def _trace(machine: QemuMachine, on: bool) -> None:
    """Turn QEMU's device-access trace events on or off (monitor ``trace-event``)."""
    for event in audit.EVENTS:
        out = machine.hmp(f"trace-event {event} {'on' if on else 'off'}")
        if out.strip():
            raise ToolError(f"QEMU refused 'trace-event {event}': {out.strip()}")


def _audit(run_dir: Path, states: list["_SliceState"], slices: list[dict], smp: int) -> None:
    """Add each launched slice's ``audit`` (testbed/audit.py) from the trace log."""
    plans: dict[int, tuple[list[int], audit.Owned]] = {}
    ecam = None
    for s, out in zip(states, slices):
        plan = (out.get("output") or {}).get("plan")
        if not plan:
            out["audit"] = None
            continue
        try:
            plans[s.job.index] = (audit.slice_cpu_indexes(plan, smp), audit.owned_from_plan(plan))
        except ValueError as exc:
            out["audit"] = {"error": str(exc)}
            continue
        for m in (plan.get("pci") or {}).get("mcfg", []):
            ecam = (m["base_address"], m["base_address"] + (256 << 20))
    path = run_dir / TRACE_FILE
    if not path.exists():  # QEMU never started tracing (no slice boot began)
        for out in slices:
            out.setdefault("audit", None)
        return
    with open(path, errors="replace") as f:
        result = audit.summarize(f, plans, ecam)
    for s, out in zip(states, slices):
        if s.job.index in result:
            out["audit"] = result[s.job.index]


def _parse_event(line: str) -> tuple[str, list[str], float | None]:
    parts = line.split()
    if not parts:
        return "", [], None
    try:
        up = float(parts[-1])
        parts = parts[:-1]
    except ValueError:
        up = None
    return parts[0], parts[1:], up


def run(options: RunOptions) -> dict:
    """Run the testbed as described by ``options``; return the result dict (see module doc)."""
    guests: list[guestos.Guest] = []
    try:
        return _run(options, guests)
    finally:  # guest disks are large: gone whatever happened (a failure, SIGTERM), unless kept
        if not options.keep_guest_disks:
            for g in guests:
                guestos.discard_disk(g)


def _run(options: RunOptions, guests: list) -> dict:
    if options.smp < 2:
        raise UsageError(f"--smp {options.smp}: the host keeps CPU 0, give at least 2 CPUs")
    check_size(options.memory, "--memory")
    check_size(options.host_mem, "--host-mem")
    check_iommu_apic(options.x2apic, options.iommu)
    if options.dma_probe and options.guest_os is not None:
        raise UsageError("--dma-probe with --guest-os: the probe runs in the testbed's own slice init; drop one")
    if options.dma_probe and not options.pci_consoles:
        raise UsageError("--dma-probe: each slice needs a console on a pxb root bus of its own, where its edu "
                         "device is placed; drop --isa-consoles")
    kernel = kernels.ensure_kernel(options.kernel_version)
    host_initrd = (initramfs.build_host_initramfs(kernel, initramfs.HOST_MODULES + sriovdevs.MODULES)
                   if options.sriov else initramfs.build_host_initramfs(kernel))
    slice_initrd = initramfs.build_slice_initramfs(kernel, dma_probe=options.dma_probe)
    if options.guest_os is not None:
        guestos.check_choice(options.guest_os, options.guest_ssh_key, len(options.slices))
        if not options.network:
            raise UsageError("--guest-os: the host reaches the slice's OS over SSH; add --network")
        options = dataclasses.replace(options, storage=True)
    data = options.storage or options.network
    if data or options.iommu:
        extra_mods = ((datapath.DATA_MODULES if data else ()) + (sriovdevs.MODULES if options.sriov else ())
                      + (dmaprobe.VFIO_MODULES if options.iommu else ()))
        host_initrd = initramfs.build_host_initramfs(kernel, initramfs.host_data_modules(kernel, extra_mods))
    if data:
        slice_initrd = initramfs.build_slice_initramfs(kernel, datapath.DATA_MODULES, dma_probe=options.dma_probe)
    run_dir = make_run_dir(options.workdir)
    hp = hostview.host_python()
    # The emulated host sees the tree read-only and cannot cache bytecode: compile it here (a
    # no-op when up to date), as an installed package has it, or every `coreslice` started in
    # the host recompiles the whole package under TCG (seconds per start).
    compileall.compile_dir(hp.pythonpath, quiet=2, workers=1)
    config = MachineConfig(
        kernel=kernel.vmlinuz,
        initrd=host_initrd,
        append=host_append(options.host_mem, options.x2apic, options.host_append_extra, iommu=options.iommu),
        smp=options.smp,
        memory=options.memory,
        cpu_model=options.cpu_model,
        x2apic=options.x2apic,
        iommu=options.iommu,
        numa=options.numa,
        extra_args=tuple(sriovdevs.device_args(ns_images=sriovdevs.namespace_images(run_dir)))
        if options.sriov else (),
        trace_file=run_dir / TRACE_FILE if options.audit else None,
    )
    machine = QemuMachine(config, run_dir)
    jobs = jobmod.complete_slice_args(options.slices, kernel.vmlinuz, slice_initrd,
                                      machine.serial_ports, allow_shared_console=options.wait_each,
                                      default_kind="pxb" if options.pci_consoles else "isa")
    links: list[datapath.SliceLink] = []
    guest_lines: list[str] = []
    if data:
        links = [datapath.link_for_port(j.port, options.storage, options.network, run_dir) for j in jobs]
        names = [ln.port.name for ln in links]
        if len(set(names)) != len(names):
            raise UsageError("--storage/--network: give each slice its own console (root bus)")
        jobs = [dataclasses.replace(j, args=datapath.slice_args(j.args, ln)) for j, ln in zip(jobs, links)]
        if options.guest_os is not None:
            key = guestos.ensure_keypair(run_dir, options.guest_ssh_key)
            for ln in links:
                guests.append(guestos.prepare(options.guest_os, run_dir, ln.k, kernel, key,
                                              options.guest_cloud_config, ln.slice_ip, ln.host_ip, ln.slice_mac,
                                              packages=options.guest_packages))
            links = [dataclasses.replace(ln, image=g.disk, image_format=g.disk_format, guest_os=True)
                     for ln, g in zip(links, guests)]
            jobs = [dataclasses.replace(j, args=guestos.slice_args(j.args, g)) for j, g in zip(jobs, guests)]
            guest_lines = guestos.host_check_lines(
                [(j.index, g, ln.slice_ip) for j, g, ln in zip(jobs, guests, links)], key, options.slice_timeout)
        datapath.build_images(links, run_dir)
        config.extra_args = tuple(config.extra_args) + tuple(datapath.machine_args(links, run_dir))
    probes: list[dmaprobe.DmaProbe] = []
    if options.dma_probe:
        probes = [dmaprobe.probe_for_port(j.port, options.storage, options.network) for j in jobs]
        names = [p.port.name for p in probes]
        if len(set(names)) != len(names):
            raise UsageError("--dma-probe: give each slice its own console (root bus)")
        jobs = [dataclasses.replace(j, args=datapath.slice_args(j.args, p)) for j, p in zip(jobs, probes)]
        config.extra_args = tuple(config.extra_args) + tuple(dmaprobe.machine_args(probes))
    # The source tree, venv and slice kernels/initrds each get a share of their own, mounted
    # at their own paths inside the host (hostview.py): a tree under /tmp works too.
    files = [p for j in jobs for p in _named_files(j.args)]
    pairs, mounts = hostview.render_mounts(hostview.mount_points(
        [*hp.shares, *(f.parent for f in files if f.parent.is_dir())]))
    config.shares = (
        Share(initramfs.HOSTROOT_TAG, Path("/"), readonly=True),
        Share(initramfs.RUN_TAG, run_dir, readonly=False),
        *(Share(tag, path, readonly=True) for tag, path in pairs),
    )
    (run_dir / "mounts").write_text(mounts)
    (run_dir / "env").write_text(jobmod.render_env(run_dir))
    jobmod.write_coreslice_wrapper(run_dir, hp.interpreter)
    (run_dir / "python-check.py").write_text(jobmod.PYTHON_CHECK)
    (run_dir / "job.sh").write_text(
        jobmod.render_job_script(run_dir, hp.interpreter, hp.pythonpath, jobs, options.host_cmds,
                                 wait_each=options.wait_each,
                                 setup_lines=datapath.host_setup_lines(links) if data else (),
                                 check_lines=guest_lines + (datapath.host_check_lines(links) if data else []))
    )
    for i, cmd in enumerate(options.host_cmds):
        (run_dir / f"hostcmd-{i}.sh").write_text(jobmod.HOSTCMD_PREAMBLE + cmd + "\n")

    progress(f"run directory {run_dir}")
    states = [_SliceState(j, guest=bool(guests)) for j in jobs]
    host: dict = {
        "kernel_release": kernel.release,
        "kernel_package_version": kernel.version,
        "run_dir": str(run_dir),
        "console_log": str(machine.console_log),
        "qemu_command": machine.command_line(),
        "x2apic_requested": options.x2apic,
        "iommu": options.iommu,
        "pci_consoles": options.pci_consoles,
        "serial_ports": [p.describe() for p in machine.serial_ports],
        "sriov": sriovdevs.describe() if options.sriov else None,
        "timings": {},
        "error": None,
    }
    timings = host["timings"]
    job_ended = False
    continued = False
    tracing = False
    all_reported_at: float | None = None
    ninep_watch = ninep.Watch()
    apic_watch = apicwatch.Watch()
    with machine:
        machine.launch()
        progress(f"QEMU pid {machine.pid} booting the emulated host (TCG: expect 10-20 s to the job)")
        t0 = machine.launched_at
        deadline = t0 + options.timeout  # type: ignore[operator]
        host_con = LogFollower(machine.console_log)
        events = LogFollower(run_dir / jobmod.EVENTS_FILE)
        consoles = {p.name: LogFollower(p.log) for p in machine.serial_ports}
        # A --console none slice's log, read from its RAM by the job (job.KMSG_FILE).
        kmsgs = {s.job.index: LogFollower(run_dir / jobmod.KMSG_FILE.format(i=s.job.index))
                 for s in states if s.job.no_console}
        while True:
            now = time.monotonic()
            for line in host_con.poll():
                if initramfs.HOST_MARK + " init" in line and "qemu_to_host_init" not in timings:
                    timings["qemu_to_host_init"] = round(now - t0, 3)
                    progress(f"host init running ({now - t0:.1f} s after QEMU start)")
                elif initramfs.HOST_MARK + " FAIL" in line:
                    host["error"] = line.split(initramfs.HOST_MARK, 1)[1].strip()
                    progress(f"host init failed: {host['error']}")
                elif "Kernel panic" in line and not host["error"]:
                    host["error"] = line.strip()
            for line in events.poll():
                name, args, up = _parse_event(line)
                if name == "job-start":
                    timings["qemu_to_job_start"] = round(now - t0, 3)
                    timings["host_uptime_at_job_start"] = up
                    progress(f"host job started ({now - t0:.1f} s after QEMU start)")
                elif name == "python-ready":
                    timings["qemu_to_python_ready"] = round(now - t0, 3)
                    progress(f"Python ready in the host (exit {args[0] if args else '?'})")
                elif name == "boot-start":
                    s = states[int(args[0])]
                    if options.audit and not tracing:
                        _trace(machine, True)
                        tracing = True
                        host["audit_window"] = {"start_uptime": up}
                    s.started, s.started_wall, s.started_uptime = now, time.time(), up
                    progress(f"slice {s.job.index}: coreslice boot {s.job.raw}")
                elif name == "boot-end":
                    s = states[int(args[0])]
                    s.exit_code = int(args[1])
                    s.ended_uptime = up
                    progress(f"slice {s.job.index}: coreslice boot exited with {s.exit_code}")
                elif name == "slices-launched":
                    timings["qemu_to_slices_launched"] = round(now - t0, 3)
                    if any(s.waiting(now, options.slice_timeout) for s in states):
                        progress("waiting for the slices to report from user space")
                elif name == "bounded" and args:
                    progress(f"host command step '{args[0]}' still running at its bound: its stacks are in "
                             f"{run_dir / ('bounded-' + args[0] + '.txt')}")
                elif name == "postmortem" and args:
                    # No APIC IDs named (a `bounded` command that hung): every CPU in use.
                    _save_postmortem(run_dir, machine, args[0], args[1:] or _apic_ids_in_use(run_dir, states))
                elif name == "hostcmd-start":
                    progress(f"host command {args[0]}: {options.host_cmds[int(args[0])]}")
                elif name == "job-end":
                    job_ended = True
                    timings["qemu_to_job_end"] = round(now - t0, 3)
            for pname, follower in consoles.items():
                for line in follower.poll():
                    rep = report.parse_report(line) if report.REPORT_TAG in line else None
                    if rep is None:
                        continue
                    # The first launched, unreported slice on this console; failing that, one
                    # whose console is not a testbed UART.
                    s = next((x for x in states if x.job.port is not None
                              and x.job.port.name == pname and x.report is None
                              and x.started is not None), None)
                    if s is None:
                        s = next((x for x in states if x.job.port is None and not x.job.no_console
                                  and x.report is None and x.started is not None), None)
                    if s is None:
                        continue
                    s.report, s.report_at = rep, now
                    s.report_log = follower.path
                    secs = now - s.started if s.started else float("nan")
                    progress(f"slice {s.job.index}: user space after {secs:.1f} s "
                             f"(cpus={rep['cpus']} mem_kib={rep['mem_kib']})")
            for index, follower in kmsgs.items():
                s = states[index]
                for line in follower.poll():
                    rep = report.parse_report(line) if report.REPORT_TAG in line else None
                    if rep is not None and s.report is None and s.started is not None:
                        s.report, s.report_at, s.report_log = rep, now, follower.path
                        progress(f"slice {s.job.index}: user space after {now - s.started:.1f} s, "
                                 "seen in its RAM (--console none)")
            for s in states:
                if (not s.diagnosed and s.report is None and s.exit_code == 0 and not s.guest
                        and s.started is not None and now - s.started >= options.slice_timeout):
                    s.diagnosed = True
                    _save_lapic_state(run_dir, machine, s)
            if options.wait_each:
                for s in states:
                    if (s.exit_code is not None and not s.released
                            and not s.waiting(now, options.slice_timeout)):
                        (run_dir / f"{jobmod.CONTINUE_FILE}-{s.job.index}").write_text("")
                        s.released = True
            if (
                not continued
                and "qemu_to_slices_launched" in timings
                and not any(s.waiting(now, options.slice_timeout) for s in states)
            ):
                if all_reported_at is None:
                    all_reported_at = now
                    if tracing:
                        progress(f"audit: tracing the slices' steady running for {options.audit_steady:.0f} s")
                if tracing and now - all_reported_at >= options.audit_steady:
                    _trace(machine, False)
                    tracing = False
                    host["audit_window"]["steady_s"] = round(now - all_reported_at, 3)
                if not tracing:
                    (run_dir / jobmod.CONTINUE_FILE).write_text("")
                    continued = True
                    if options.host_cmds:
                        progress("running host commands")
            if job_ended:
                rc = machine.wait(timeout=30)
                if rc is None:
                    progress("host did not power off within 30 s; stopping QEMU")
                break
            if machine.poll() is not None:
                for line in events.poll():  # the last lines written before the exit
                    if _parse_event(line)[0] == "job-end":
                        job_ended = True
                if not job_ended and not host["error"]:
                    host["error"] = f"QEMU exited ({machine.exit_code}) before the host job ended"
                if host["error"]:
                    progress(host["error"] + f"; see {machine.console_log}")
                break
            try:
                for msg in ninep_watch.poll(now, machine.hmp):
                    progress(msg)
                lost = apic_watch.poll(now, machine.hmp, _host_cpus(run_dir))
            except (OSError, ToolError):
                lost = []  # the monitor is busy or gone: the next look, or the exit, tells
            if lost:
                # The host can take no device interrupt again: end now, with the reason, rather
                # than at --timeout.
                host["error"] = f"emulator fault: {lost[0]}"
                progress(host["error"])
                _save_postmortem(run_dir, machine, "lost-eoi", _apic_ids_in_use(run_dir, states),
                                 extra=("info pic", "info irq"))
                break
            if now > deadline:
                host["error"] = f"timed out after {options.timeout:.0f} s (--timeout)"
                progress(host["error"] + f"; see {machine.console_log}")
                # What every CPU was doing, and the interrupt controllers (info pic: the IOAPIC's
                # redirection entries, which a slice must not touch), before QEMU goes: a hung
                # host is otherwise not diagnosable after the fact.
                _save_postmortem(run_dir, machine, "timeout", _apic_ids_in_use(run_dir, states),
                                 extra=("info pic", "info irq"))
                break
            time.sleep(0.05)
        machine.shutdown()
    timings["qemu_total"] = round(time.monotonic() - t0, 3)  # type: ignore[operator]
    host["qemu_exit_code"] = machine.exit_code
    host["job_finished"] = job_ended
    host["ninep_lost_kicks"] = ninep_watch.events  # QEMU's, kicked again (testbed/ninep.py)
    host["lost_eois"] = apic_watch.events  # QEMU's, said only (testbed/apicwatch.py)
    result = _collect(run_dir, machine, states, options, host)
    if data:
        _collect_data(run_dir, result, states, links)
    if probes:
        _collect_dma(run_dir, machine, result, states, probes, options.iommu)
    if guests:
        _collect_guests(run_dir, result, states, guests)
    return result


def _collect_guests(run_dir: Path, result: dict, states: list[_SliceState], guests: list) -> None:
    ok = True
    for s, g, out in zip(states, guests, result["slices"]):
        o = guestos.result(run_dir, s.job.index, g, s.ended_uptime)
        out["os"] = o
        out["booted"] = o["ssh_ok"]
        ok = ok and o["ssh_ok"] and o["cloud_init"] == "done" and (g.hostname is None or o["hostname"] == g.hostname)
    result["guest_os_ok"] = bool(ok)
    # "booted" of a guest slice is its SSH login, known only now: the overall verdict again.
    booted = all(sl["booted"] for sl in result["slices"] if sl["exit_code"] == 0)
    result["ok"] = bool(result["host"]["job_finished"] and booted and result.get("data_ok", True) and ok)
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")


def _collect_dma(run_dir: Path, machine: QemuMachine, result: dict, states: list[_SliceState],
                 probes: list[dmaprobe.DmaProbe], iommu: bool) -> None:
    """Add each slice's ``dma``: its probe's answer and the host's DMAR faults of its edu (the
    host's log after the slices reported; if it has none, its console to the end)."""
    host_log = _read(run_dir / "dmesg-end.txt") or ""
    if not dmaprobe.dmar_faults(host_log):  # one source only: both would list each fault twice
        host_log = _read(machine.console_log) or ""
    ok = True
    for s, probe, out in zip(states, probes, result["slices"]):
        out["dma"] = dmaprobe.slice_result(probe, s.report, host_log)
        ok = ok and dmaprobe.dma_ok(out["dma"], iommu)
    result["dma_ok"] = bool(ok)
    result["ok"] = bool(result["ok"] and ok)
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")


def _collect_data(run_dir: Path, result: dict, states: list[_SliceState],
                  links: list[datapath.SliceLink]) -> None:
    """Add the data path's outcome (checked in the images now that QEMU stopped)."""
    ok = True
    for s, link, out in zip(states, links, result["slices"]):
        d = datapath.slice_result(link, s.report)
        out.update(d)
        if "storage" in d:
            ok = ok and d["storage"]["written"] and d["storage"]["read"] == d["storage"]["expected"]
        if "network" in d:
            ok = ok and d["network"]["ping_ok"]
    h = datapath.host_result(run_dir, links)
    result["host"]["data"] = h
    ok = ok and h["disk"]["ok"] and h["network"]["ping_ok"]
    result["data_ok"] = bool(ok)
    result["ok"] = bool(result["ok"] and ok)
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")


def _collect(run_dir: Path, machine: QemuMachine, states: list[_SliceState], options: RunOptions,
             host: dict) -> dict:
    dmesg = _read(run_dir / "dmesg-start.txt") or _read(machine.console_log) or ""
    cpuinfo = _read(run_dir / "host-cpuinfo.txt") or ""
    meminfo = _read(run_dir / "host-meminfo.txt") or ""
    release = (_read(run_dir / "host-release.txt") or "").strip()
    if release:
        host["kernel_release"] = release
    check = _read(run_dir / "python-check.txt") or ""
    m = re.search(r"^apic_base (0x[0-9a-f]+)", check, re.M)
    host["apic_base_msr"] = m.group(1) if m else None
    host["apic_mode"] = apic_mode(int(m.group(1), 16) if m else None, dmesg)
    host["cpu_has_x2apic"] = bool(re.search(r"^flags\s*:.*\bx2apic\b", cpuinfo, re.M))
    host["cmdline"] = (_read(run_dir / "host-cmdline.txt") or "").strip()
    host["online_cpus"] = (_read(run_dir / "host-cpu-online.txt") or "").strip()
    m = re.search(r"^MemTotal:\s*(\d+)", meminfo, re.M)
    host["mem_total_kib"] = int(m.group(1)) if m else None
    for when in ("before", "after"):
        text = _read(run_dir / f"interrupts-{when}.txt")
        host[f"interrupts_{when}"] = interrupts.totals(text) if text else None
    in_host = pci_functions(_read(run_dir / "host-pci.txt") or "")
    windows = root_bus_resources(dmesg)
    for port in host.get("serial_ports", []):
        if port.get("pci_address"):
            port["in_host"] = in_host.get(port["pci_address"])
            port["root_bus_resources"] = windows.get(port["root_bus"], [])
    pci = machine.pci_serial
    host["pci_serial"] = {
        "address": pci.pci_address if pci else None,
        "console_log": str(pci.log) if pci else None,
        "in_host": in_host.get(pci.pci_address) if pci else None,
    }
    py = (_read(run_dir / "python-start.txt") or "").split()
    if len(py) == 3:
        host["python_exit_code"] = int(py[0])
        try:
            host["timings"]["python_start"] = round(float(py[2]) - float(py[1]), 3)
        except ValueError:
            pass
    host["python_check"] = check.strip()

    slices = []
    for s in states:
        i = s.job.index
        stdout = _read(run_dir / f"slice-{i}.stdout")
        try:
            parsed = json.loads(stdout) if stdout and stdout.strip() else None
        except ValueError:
            parsed = None
        rep = s.report or {}
        log = s.report_log or (s.job.port.log if s.job.port else None)
        slices.append({
            "args": list(s.job.args),
            "exit_code": s.exit_code,
            # What `coreslice boot --json` printed: raw text, and parsed (None if not JSON).
            "stdout": stdout,
            "output": parsed,
            "stderr": _read(run_dir / f"slice-{i}.stderr"),
            "booted": s.report is not None,
            "cpus": rep.get("cpus"),
            "mem_kib": rep.get("mem_kib"),
            "apic_ids": rep.get("apic_ids"),
            "pci": rep.get("pci"),
            "kernel_code": rep.get("kernel_code"),
            "cmdline": rep.get("cmdline"),
            "seconds_to_userspace": round(s.report_at - s.started, 3)
            if s.report_at is not None and s.started is not None else None,
            "loader_seconds": round(s.ended_uptime - s.started_uptime, 3)
            if s.ended_uptime is not None and s.started_uptime is not None else None,
            "boot_started_at": s.started_wall,
            "console": s.job.port.name if s.job.port else None,
            "console_log": str(log) if log else None,
        })
    host_cmds = []
    for i, cmd in enumerate(options.host_cmds):
        host_cmds.append({
            "cmd": cmd,
            "exit_code": _read_int(run_dir / f"hostcmd-{i}.rc"),
            "output": _read(run_dir / f"hostcmd-{i}.out"),
        })
    if options.audit:
        _audit(run_dir, states, slices, options.smp)
    ok = host["job_finished"] and all(
        sl["booted"] for sl in slices if sl["exit_code"] == 0
    )
    result = {"ok": bool(ok), "host": host, "slices": slices, "host_cmds": host_cmds}
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def exit_status(result: dict) -> int:
    return 0 if result.get("ok") else 1


def format_summary(result: dict) -> str:
    h = result["host"]
    t = h.get("timings", {})
    out = [
        f"host: kernel {h.get('kernel_release')}, {h.get('apic_mode')} mode"
        f"{', IOMMU on (DMA remapping)' if h.get('iommu') else ''}, online CPUs "
        f"{h.get('online_cpus') or '?'}, MemTotal {h.get('mem_total_kib')} kB",
        f"      QEMU -> host init {t.get('qemu_to_host_init', '?')} s, -> job {t.get('qemu_to_job_start', '?')} s, "
        f"Python start {t.get('python_start', '?')} s, total {t.get('qemu_total', '?')} s",
        f"      PCI UART {h['pci_serial']['address']} ({(h['pci_serial']['in_host'] or {}).get('class', 'not seen')})",
        *(f"      PCI UART {p['pci_address']} on root bus {p['root_bus']} "
          f"({'seen' if p.get('in_host') else 'not seen'} by the host; {p['log']})"
          for p in h.get("serial_ports", []) if p.get("kind") == "pxb"),
        f"      run dir {h['run_dir']}",
    ]
    if h.get("error"):
        out.append(f"      ERROR: {h['error']}")
    for k in ("CAL", "RES", "TLB"):
        b = (h.get("interrupts_before") or {}).get(k)
        a = (h.get("interrupts_after") or {}).get(k)
        out.append(f"      {k}: {b} before slices, {a} after")
    for i, s in enumerate(result["slices"]):
        state = "booted" if s["booted"] else ("boot failed" if s["exit_code"] else "NO REPORT")
        line = f"slice {i}: {state}; coreslice boot exit {s['exit_code']}"
        if s["booted"]:
            line += (f"; cpus={s['cpus']} mem_kib={s['mem_kib']} apic_ids={s['apic_ids']}"
                     f"; user space after {s['seconds_to_userspace']} s")
        out.append(line)
        if s.get("storage"):
            st = s["storage"]
            out.append(f"         storage: read {st['read']!r} (expected {st['expected']!r}), "
                       f"result file {'written' if st['written'] else 'NOT written'}")
        if s.get("network"):
            nt = s["network"]
            out.append(f"         network: ping {nt['peer']} from {nt['address']} "
                       f"{'ok, rtt ' + str(nt['rtt_ms']) + ' ms' if nt['ping_ok'] else 'FAILED'}")
        if s.get("dma"):
            out.append("         " + dmaprobe.describe(s["dma"]))
        if s.get("os"):
            o = s["os"]
            out.append(f"         os: ssh {o['user']}@ " + (
                f"ok after {o['seconds_to_ssh']} s: hostname {o['hostname']}, {o['nproc']} CPUs, root "
                f"{o['root_source']}, cloud-init {o['cloud_init']}" if o["ssh_ok"] else f"FAILED ({o['ssh_error']})"))
        if s.get("audit"):
            a = s["audit"]
            if "error" in a:
                out.append(f"         audit: {a['error']}")
            else:
                out.append(f"         audit: {a['accesses']} device accesses by CPUs {a['cpus']}; foreign:"
                           + ("" if a["foreign"] else " none"))
                for what, n in audit.foreign_by_what(a).items():
                    out.append(f"           {what}: {n['reads']} reads, {n['writes']} writes")
        out.append(f"         console log {s['console_log']}")
        if s["exit_code"] and s.get("stderr"):
            out += ["         " + ln for ln in s["stderr"].strip().splitlines()[-5:]]
    d = h.get("data")
    if d:
        out.append(f"host data: own disk read {d['disk']['read_after']!r} after the slices "
                   f"({'ok' if d['disk']['ok'] else 'FAILED'}); ping {d['network']['peer']} "
                   f"{'ok' if d['network']['ping_ok'] else 'FAILED'}; pings to slices: "
                   + (", ".join(f"{ip} {'ok' if p['ok'] else 'FAILED'}"
                                for ip, p in d['network']['slices'].items()) or "none"))
    for c in result["host_cmds"]:
        out.append(f"$ {c['cmd']}   (exit {c['exit_code']})")
        out += ["  " + ln for ln in (c["output"] or "").rstrip().splitlines()]
    out.append("OK" if result["ok"] else "FAILED")
    return "\n".join(out)


def main_run(options: RunOptions, as_json: bool) -> int:
    try:
        result = run(options)
    except CoresliceError as exc:
        print(f"coreslice testbed: {exc}", file=sys.stderr)
        return exc.exit_code
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(format_summary(result))
    return exit_status(result)
