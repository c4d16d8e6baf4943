"""What runs inside the emulated host: slice argument completion and the job script.

The job script (``$RUN_DIR/job.sh``, run by the host initramfs inside the chroot of the build
machine's root) talks to the outside through files in the run directory, which is shared
read-write over 9p with ``cache=none``:

- ``events``: one line per step, ``<event> [args] <guest uptime>``, appended as it happens
  (``job-start``, ``python-ready``, ``boot-start <i>``, ``boot-end <i> <rc>``,
  ``slices-launched``, ``hostcmd-start <i>``, ``hostcmd-end <i> <rc>``, ``job-end``);
- ``slice-<i>.stdout|.stderr|.rc``: what ``coreslice boot ... --json`` printed and returned;
- ``hostcmd-<i>.out|.rc``: output and exit code of each ``--host-cmd``; a host command may call
  ``postmortem LABEL [APIC_ID...]`` (HOSTCMD_PREAMBLE), which appends ``postmortem ...`` to
  ``events`` and waits until the outside has saved the vCPUs' state in ``postmortem-LABEL.txt``;
- host facts: ``interrupts-before.txt``, ``interrupts-after.txt``, ``dmesg-*.txt`` ...

After launching the slices the job waits for a file ``continue`` that the outside creates once
every launched slice has reported (or timed out).  With ``wait_each`` it also waits for
``continue-<i>`` after each slice, so that slice i reports before slice i+1 is booted.  The same events are echoed to the host
console (``CORESLICE-JOB ...``) for a human following it.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from coreslice.errors import UsageError
from coreslice.testbed.report import REPORT_TAG
from coreslice.testbed.topology import SerialPort

CONTINUE_FILE = "continue"

# Run once in the host before the slices: times a Python start (and warms the 9p page cache
# for the loader), checks that this tree's coreslice imports, and reads IA32_APIC_BASE (MSR
# 0x1b: bit 11 = APIC enabled, bit 10 = x2APIC mode), the authoritative APIC mode.
PYTHON_CHECK = """\
import os, struct, sys
import coreslice
print("coreslice", coreslice.__file__)
print("python", sys.version.split()[0], sys.executable)
try:
    fd = os.open("/dev/cpu/0/msr", os.O_RDONLY)
    base = struct.unpack("<Q", os.pread(fd, 8, 0x1B))[0]
    os.close(fd)
    print("apic_base", hex(base))
except OSError as exc:
    print("apic_base", "unreadable", exc)
"""
EVENTS_FILE = "events"

# Put before every host command: `postmortem LABEL [APIC_ID...]` asks the outside for QEMU's view
# of the vCPUs (registers, local APIC) while a slice is stuck, and waits (at most 60 s) until it
# has been written, so that the command's next step (a restart, say) does not change it first.
#
# `bounded LABEL SECONDS CMD...` runs CMD (with its caller's redirections) for at most SECONDS.
# A command still running then is a hang to explain, not to wait out: its threads' kernel stacks
# and states go to bounded-LABEL.txt, the host kernel's blocked tasks and CPU backtraces to its
# console (sysrq w, l), then SIGABRT makes Python print where it was (PYTHONFAULTHANDLER, to the
# command's stderr), SIGKILL follows, and `postmortem LABEL` keeps QEMU's view of the vCPUs.
# Returns CMD's exit code, 124 after a timeout.
HOSTCMD_PREAMBLE = """\
postmortem() {
    echo "postmortem $* $(cut -d' ' -f1 /proc/uptime)" >>"$RUN/events"
    n=0; while [ ! -e "$RUN/postmortem-$1.done" ] && [ $n -lt 300 ]; do sleep 0.2; n=$((n+1)); done
}
bounded() {
    _bl=$1; _bs=$2; shift 2
    PYTHONFAULTHANDLER=1 "$@" &
    _bp=$!; _bn=0
    while kill -0 $_bp 2>/dev/null && [ $_bn -lt $_bs ]; do sleep 1; _bn=$((_bn+1)); done
    if kill -0 $_bp 2>/dev/null; then
        { echo "bounded $_bl: pid $_bp still running after $_bs s: $*"
          for t in /proc/$_bp/task/*; do echo "== $t $(cat $t/comm 2>/dev/null)"; grep -E '^(State|voluntary|nonvoluntary)' $t/status 2>/dev/null
            echo "wchan $(cat $t/wchan 2>/dev/null)"; cat $t/stack 2>/dev/null; done
          echo "== children"; cat /proc/$_bp/task/*/children 2>/dev/null; echo; } >"$RUN/bounded-$_bl.txt" 2>&1
        { echo w > /proc/sysrq-trigger; echo l > /proc/sysrq-trigger; } 2>/dev/null
        echo "bounded $_bl timeout $(cut -d' ' -f1 /proc/uptime)" >>"$RUN/events"
        kill -ABRT $_bp 2>/dev/null; _bn=0
        while kill -0 $_bp 2>/dev/null && [ $_bn -lt 10 ]; do sleep 0.5; _bn=$((_bn+1)); done
        kill -KILL $_bp 2>/dev/null; wait $_bp
        postmortem "$_bl"
        return 124
    fi
    wait $_bp
}
"""
LEDGER_PATH = "/run/coreslice/ledger.sqlite3"  # in the emulated host (tmpfs)


@dataclass(frozen=True)
class SliceJob:
    index: int
    raw: str  # the --slice string as given
    args: tuple[str, ...]  # completed `coreslice boot` arguments (without --json)
    port: SerialPort | None  # the console the slice reports on, when known

    @property
    def no_console(self) -> bool:
        """Booted with ``--console none``: its report is read from its RAM (``coreslice console``)."""
        return (option_value(self.args, "--console") or "").strip().lower() == "none"


# A slice without a UART reports into its kernel log only: the job reads that from the slice's RAM
# (`coreslice console NAME --wait`, in the background) into slice-<i>.kmsg, which the outside
# watches as it watches the UART logs.
KMSG_FILE = "slice-{i}.kmsg"


def option_value(args: Sequence[str], name: str) -> str | None:
    """The value of ``--name X`` / ``--name=X`` in ``args`` (last wins), or None."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def _has_option(args: Sequence[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in args)


_PCI_IN_CONSOLE = re.compile(r"(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])")


def port_for_console(console: str, ports: Sequence[SerialPort]) -> SerialPort | None:
    """The testbed UART a ``--console`` value designates (``io:0x2f8`` style or one naming a
    PCI UART's address, with or without the segment), or None when it is not one of the
    testbed's."""
    m = re.match(r"^(?:io|port|uart,io)[:,](0x[0-9a-fA-F]+|[0-9]+)", console.strip())
    if m:
        base = int(m.group(1), 0)
        return next((p for p in ports if p.iobase == base), None)
    m = _PCI_IN_CONSOLE.search(console)
    if m:
        seg, bus, dev, fn = m.groups()
        addr = f"{(seg or '0000').lower()}:{bus.lower()}:{dev.lower()}.{fn}"
        return next((p for p in ports if p.pci_address == addr), None)
    return None


def complete_slice_args(
    slices: Sequence[str],
    kernel: Path,
    initrd: Path,
    ports: Sequence[SerialPort],
    allow_shared_console: bool = False,
    default_kind: str = "isa",
) -> list[SliceJob]:
    """Split each ``--slice`` string and add ``--kernel``, ``--initrd`` and a free
    ``--console`` when the string does not give them: of the ports of ``default_kind``, in
    order, skipping ports that any slice names itself -- ``"isa"``: io:0x2f8, io:0x3e8,
    io:0x2e8; ``"pxb"``: the PCI UARTs on their own root buses (0000:21:00.0, 0000:41:00.0,
    0000:61:00.0).

    Two slices may name the same console only with ``allow_shared_console`` (``--wait-each``:
    each slice reports before the next is booted, e.g. to relaunch on the same CPUs)."""
    split = []
    for raw in slices:
        try:
            split.append(shlex.split(raw))
        except ValueError as exc:
            raise UsageError(f"--slice {raw!r}: {exc}") from exc
    taken: set[str] = set()
    for args in split:
        console = option_value(args, "--console")
        if console is not None:
            port = port_for_console(console, ports)
            if port is not None:
                if port.name in taken and not allow_shared_console:
                    raise UsageError(
                        f"--console {console}: port {port.name} is given to two slices; "
                        "give each slice its own console, or use --wait-each to boot them "
                        "one after the other"
                    )
                taken.add(port.name)
    free = [p for p in ports if p.kind == default_kind and p.name not in taken]
    jobs = []
    for i, (raw, args) in enumerate(zip(slices, split)):
        args = list(args)
        if not _has_option(args, "--kernel"):
            args += ["--kernel", str(kernel)]
        if not _has_option(args, "--initrd"):
            args += ["--initrd", str(initrd)]
        console = option_value(args, "--console")
        if console is None:
            if not free:
                defaults = ", ".join(p.console_arg for p in ports if p.kind == default_kind)
                others = ", ".join(p.console_arg for p in ports
                                   if p.kind != default_kind and p.name not in taken) or "none"
                what = "ISA" if default_kind == "isa" else "PCI root-bus"
                raise UsageError(
                    f"--slice {raw!r}: no free {what} console left ({defaults} are taken); "
                    f"give it --console with one of the other free UARTs ({others})"
                )
            port = free.pop(0)
            args += ["--console", port.console_arg]  # type: ignore[list-item]
        else:
            port = port_for_console(console, ports)
        jobs.append(SliceJob(i, raw, tuple(args), port))
    return jobs


def _wait_for(name: str, timeout: float) -> str:
    """Shell line: poll (5 Hz) until the outside creates ``$RUN/<name>``."""
    return (f'n=0; while [ ! -e "$RUN/{name}" ] && [ $n -lt {int(timeout * 5)} ]; do'
            " sleep 0.2; n=$((n+1)); done")


WRAPPER_DIR = "bin"  # in the run directory: a ``coreslice`` command first on the job's PATH


def write_coreslice_wrapper(run_dir: Path, python: str) -> Path:
    """``$RUN/bin/coreslice``: runs this tree's coreslice with ``python``, so that ``coreslice
    ...`` in a --host-cmd works whether or not an entry-point script is installed."""
    d = Path(run_dir) / WRAPPER_DIR
    d.mkdir(exist_ok=True)
    path = d / "coreslice"
    path.write_text(f'#!/bin/sh\nexec {shlex.quote(python)} -m coreslice "$@"\n')
    path.chmod(0o755)
    return path


def render_env(run_dir: Path) -> str:
    """The ``env`` file the host initramfs sources from the run share."""
    return f"RUN_DIR={shlex.quote(str(run_dir))}\n"


def render_job_script(
    run_dir: Path,
    python: str,
    pythonpath: str,
    slices: Sequence[SliceJob],
    host_cmds: Sequence[str],
    continue_timeout: float = 3600.0,
    wait_each: bool = False,
    setup_lines: Sequence[str] = (),
    check_lines: Sequence[str] = (),
) -> str:
    """The shell script the emulated host runs (POSIX sh: the chroot's /bin/sh is dash).
    ``setup_lines`` run before the first slice boots, ``check_lines`` after the slices
    reported (before the host commands); see testbed/datapath.py."""
    q = shlex.quote
    pybin = str(Path(python).parent)
    boot = "-m coreslice boot"
    lines = [
        "#!/bin/sh",
        "# Generated by coreslice testbed; runs inside the emulated host's chroot.",
        f"export RUN={q(str(run_dir))}",
        f"PY={q(python)}",
        f'export PATH="$RUN/{WRAPPER_DIR}":{q(pybin)}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
        f"export PYTHONPATH={q(pythonpath)}",
        # The host's root is the build machine's, shared read-only: the ledger goes on its tmpfs.
        f"export CORESLICE_LEDGER={LEDGER_PATH}",
        "export HOME=/root TERM=dumb LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1",
        'cd "$RUN" || exit 90',
        'up() { read u _ </proc/uptime; echo "$u"; }',
        'event() { echo "$* $(up)" >>"$RUN/events"; echo "CORESLICE-JOB $* uptime=$(up)"; }',
        "event job-start",
        "uname -r >host-release.txt",
        "cat /proc/cmdline >host-cmdline.txt",
        "cat /sys/devices/system/cpu/online >host-cpu-online.txt",
        "cat /proc/meminfo >host-meminfo.txt",
        "cat /proc/cpuinfo >host-cpuinfo.txt",
        "dmesg >dmesg-start.txt 2>&1",
        "cat /proc/ioports >host-ioports.txt",
        "for d in /sys/bus/pci/devices/*; do",
        '  drv=$(readlink "$d/driver" 2>/dev/null); drv=${drv##*/}',
        '  echo "${d##*/} $(cat "$d/class") $(cat "$d/vendor") $(cat "$d/device") ${drv:--}"',
        "done >host-pci.txt 2>&1",
        "cat /proc/interrupts >interrupts-before.txt",
        # Time one Python start (it also warms the 9p page cache for the loader).
        't0=$(date +%s.%N); "$PY" "$RUN/python-check.py" >python-check.txt 2>&1; prc=$?',
        'echo "$prc $t0 $(date +%s.%N)" >python-start.txt',
        "event python-ready $prc",
        *setup_lines,
    ]
    for job in slices:
        i = job.index
        argv = " ".join(q(a) for a in job.args)
        lines += [
            f"event boot-start {i}",
            f'"$PY" {boot} {argv} --json >slice-{i}.stdout 2>slice-{i}.stderr </dev/null',
            f"rc=$?; echo $rc >slice-{i}.rc",
            f"event boot-end {i} $rc",
        ]
        if job.no_console:
            kmsg = KMSG_FILE.format(i=i)
            lines += [
                f'name=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))[\'slice\'][\'name\'])" '
                f'slice-{i}.stdout 2>/dev/null)',
                f'[ -n "$name" ] && "$PY" -m coreslice console "$name" --wait {q(REPORT_TAG)} '
                f'--timeout {int(continue_timeout)} >{kmsg} 2>&1 </dev/null &',
            ]
        if wait_each:
            lines.append(_wait_for(f"{CONTINUE_FILE}-{i}", continue_timeout))
    lines += [
        "event slices-launched",
        _wait_for(CONTINUE_FILE, continue_timeout),
        "cat /proc/interrupts >interrupts-after.txt",
        "dmesg >dmesg-end.txt 2>&1",
        *check_lines,
    ]
    for i, _cmd in enumerate(host_cmds):
        lines += [
            f"event hostcmd-start {i}",
            f'/bin/sh "$RUN/hostcmd-{i}.sh" >hostcmd-{i}.out 2>&1 </dev/null',
            f"rc=$?; echo $rc >hostcmd-{i}.rc",
            f"event hostcmd-end {i} $rc",
        ]
    lines += ["sync", "event job-end", ""]
    return "\n".join(lines)
