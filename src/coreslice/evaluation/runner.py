"""``eval run``'s loop: check the tools are there, run a workload's steps N times on its targets,
keep every raw output, parse the figures, and stop any server it started, even on failure."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from coreslice.errors import LaunchError, UsageError
from coreslice.evaluation.results import ResultSet
from coreslice.evaluation.targets import Target
from coreslice.evaluation.workloads import ParseError, Params, Step, Workload

STEP_SLACK_S = 120  # on top of a step's own run length: tool start, a slow ssh


def missing_tools(w: Workload, p: Params, targets: dict[str, Target], timeout: float = 60) -> list[str]:
    """The step programs absent where they run, and the workload's own checks that fail (a
    Python module, a block device), as 'WHAT on TARGET'."""
    need: dict[str, set[str]] = {}
    for st in w.steps(p):
        need.setdefault(st.where, set()).add(st.program)
    missing = []
    for where, tools in sorted(need.items()):
        t = targets[where]
        names = sorted(tools)
        got = t.run(["sh", "-c", " ".join(f"command -v {shlex.quote(n)} >/dev/null || echo {shlex.quote(n)};"
                                          for n in names)], timeout)
        if got.rc != 0:
            raise LaunchError(f"cannot run a command on {t.name}: {(got.stderr or got.stdout).strip()[-300:]}")
        missing += [f"{n} on {t.name}" for n in got.stdout.split()]
    for where, argv, what in w.checks(p):
        if targets[where].run(list(argv), timeout).rc != 0:
            missing.append(f"{what} on {targets[where].name}")
    return missing


def _raw_name(w: Workload, column: str, i: int, label: str) -> str:
    return f"{w.name}-{column}-{i}-{label}.txt"


def run(w: Workload, p: Params, targets: dict[str, Target], rs: ResultSet, repeat: int, raw_dir: Path,
        progress: Callable[[str], None] = lambda _m: None, clock=time.monotonic) -> ResultSet:
    raw_dir.mkdir(parents=True, exist_ok=True)
    first = len(rs.runs) + 1  # after the runs of an --append
    for i in range(first, first + repeat):
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        t0 = clock()
        outputs: dict[str, str] = {}
        raw: list[str] = []
        servers: list[Step] = []
        try:
            for st in w.steps(p):
                t = targets[st.where]
                progress(f"{w.name} {rs.column} run {i}/{first + repeat - 1}: {st.label} on {t.name}")
                got = t.run(list(st.argv), timeout=p.seconds + st.extra_s + STEP_SLACK_S)
                name = _raw_name(w, rs.column, i, st.label)
                (raw_dir / name).write_text(got.stdout + (f"\n--- stderr ---\n{got.stderr}" if got.stderr else ""))
                raw.append(name)
                if got.rc != 0:
                    raise LaunchError(f"{w.name}: '{shlex.join(st.argv)[:120]}' on {t.name} exited {got.rc}: "
                                      f"{(got.stderr or got.stdout).strip()[-300:]} (raw output in {raw_dir / name})")
                if st.background:  # its own command waited until it listens
                    servers.append(st)
                outputs[st.label] = got.stdout
        finally:
            for st in reversed(servers):
                done = targets[st.where].run(list(st.stop), timeout=30)
                if done.rc != 0:  # said, not raised: the run's own error (if any) matters more
                    progress(f"warning: stopping {st.label} on {targets[st.where].name} failed: "
                             f"{(done.stderr or done.stdout).strip()[-200:]}; stop it by hand")
        try:
            metrics = w.parse(outputs, p)
        except ParseError as e:
            raise LaunchError(f"{w.name} run {i}: {e} (raw output in {raw_dir})") from None
        rs.runs.append({"started": started, "seconds": round(clock() - t0, 3), "metrics": metrics, "raw": raw})
        progress(f"{w.name} {rs.column} run {i}/{first + repeat - 1}: " + ", ".join(f"{k}={v:.6g}" for k, v in metrics.items()))
    return rs


def check_repeat(n: int) -> int:
    if not 1 <= n <= 100:
        raise UsageError(f"--repeat {n}: give 1 to 100 runs (the report takes their median)")
    return n
