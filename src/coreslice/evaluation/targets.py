"""Where an eval command runs: this host (``Local``) or a slice or VM over ssh (``Ssh``).

The one side effect of ``eval run``; tests give a fake with the same ``run``.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from typing import Protocol

from coreslice.errors import UsageError


@dataclass(frozen=True)
class Completed:
    rc: int
    stdout: str
    stderr: str


class Target(Protocol):
    name: str

    def run(self, argv: list[str] | tuple[str, ...], timeout: float) -> Completed: ...


def _run(argv: list[str], timeout: float) -> Completed:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return Completed(127, "", f"{argv[0]}: not found")
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return Completed(124, out, f"timed out after {timeout:.0f} s")
    return Completed(p.returncode, p.stdout, p.stderr)


@dataclass(frozen=True)
class Local:
    name: str = "this host"

    def run(self, argv, timeout: float) -> Completed:
        return _run(list(argv), timeout)


@dataclass(frozen=True)
class Ssh:
    """``ssh DEST 'CMD'``, non-interactive: a missing key fails at once instead of prompting."""

    dest: str                       # [user@]host
    port: int | None = None
    identity: str | None = None

    @property
    def name(self) -> str:
        return self.dest

    def argv(self, argv) -> list[str]:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "StrictHostKeyChecking=accept-new"]
        if self.port:
            cmd += ["-p", str(self.port)]
        if self.identity:
            cmd += ["-i", self.identity]
        return cmd + [self.dest, "--", shlex.join(list(argv))]

    def run(self, argv, timeout: float) -> Completed:
        # The remote side gets the same bound: killing the local ssh leaves a command without a
        # terminal running there.
        bounded = ["timeout", "-s", "KILL", str(max(1, int(timeout) - 5)), *argv]
        return _run(self.argv(bounded), timeout)


def parse_dest(text: str, identity: str | None = None) -> Ssh:
    """``[user@]host[:port]`` for --ssh / --client."""
    dest, port = text, None
    if text.count(":") == 1:
        dest, _, p = text.partition(":")
        if not p.isdigit() or not 0 < int(p) < 65536:
            raise UsageError(f"'{text}': the port after ':' must be a number 1-65535")
        port = int(p)
    if not dest or any(c.isspace() for c in dest) or dest.startswith("-"):
        raise UsageError(f"'{text}' is not [user@]host[:port]")
    return Ssh(dest, port, identity)


# What the environment record asks the target: kernel, CPUs online, memory, PCI functions and
# their drivers, and whether it runs under an emulator or hypervisor (the CPUID hypervisor flag).
ENV_SCRIPT = r"""
uname -r
nproc
grep -m1 MemTotal /proc/meminfo
grep -m1 -o -w hypervisor /proc/cpuinfo || echo bare
cat /proc/cmdline
for d in /sys/bus/pci/devices/*; do
  [ -e "$d" ] || continue
  drv=$(readlink "$d/driver" 2>/dev/null); echo "pci ${d##*/} $(cat $d/vendor):$(cat $d/device) ${drv##*/}"
done
"""


def environment(target: Target, timeout: float = 60) -> dict:
    got = target.run(["sh", "-c", ENV_SCRIPT], timeout)
    if got.rc != 0:
        return {"error": (got.stderr or got.stdout).strip()[-300:] or f"exit {got.rc}"}
    lines = got.stdout.splitlines()
    env: dict = {"target": target.name}
    try:
        env["kernel"] = lines[0]
        env["cpus"] = int(lines[1])
        env["memory_kib"] = int(lines[2].split()[1])
        env["hypervisor_flag"] = lines[3].strip() == "hypervisor"
        env["cmdline"] = lines[4]
    except (IndexError, ValueError):
        env["unparsed"] = got.stdout[-500:]
        return env
    env["pci"] = [" ".join(line.split()[1:]) for line in lines[5:] if line.startswith("pci ")]
    return env
