"""The files ``eval run`` writes and ``eval report`` reads: ``DIR/WORKLOAD-MODE[-VARIANT].json``.

One file holds N repeats of one workload in one mode, each repeat's metrics and raw output file
names, and the environment measured (the target's kernel, CPUs, memory, PCI functions; the host's
profile; whether the machine is emulated, whose figures are no performance claims).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from coreslice.errors import UsageError

SCHEMA = "coreslice-eval-1"
MODES = ("slice", "vm", "native")


@dataclass
class ResultSet:
    workload: str
    mode: str
    variant: str | None                       # e.g. "1G" for a VM on 1 GiB pages
    metrics: dict[str, dict]                  # name -> {"unit", "higher_is_better"}
    runs: list[dict] = field(default_factory=list)  # {"started", "seconds", "metrics": {name: value}, "raw": [...]}
    environment: dict = field(default_factory=dict)

    @property
    def column(self) -> str:
        """The report's column: the mode, with its variant (``vm-1G``)."""
        return f"{self.mode}-{self.variant}" if self.variant else self.mode

    def values(self, metric: str) -> list[float]:
        return [r["metrics"][metric] for r in self.runs if metric in r.get("metrics", {})]

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "workload": self.workload, "mode": self.mode, "variant": self.variant,
                "metrics": self.metrics, "runs": self.runs, "environment": self.environment}

    @classmethod
    def from_json(cls, doc: dict, source: str = "?") -> "ResultSet":
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise UsageError(f"{source} is not an eval result ({SCHEMA}); give directories written by coreslice eval run")
        try:
            rs = cls(workload=str(doc["workload"]), mode=str(doc["mode"]), variant=doc.get("variant"),
                     metrics=dict(doc["metrics"]), runs=list(doc["runs"]), environment=dict(doc.get("environment") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"{source}: malformed eval result ({e})") from None
        if rs.mode not in MODES:
            raise UsageError(f"{source}: mode '{rs.mode}' is none of {', '.join(MODES)}")
        return rs


def file_name(workload: str, mode: str, variant: str | None) -> str:
    tail = f"-{variant}" if variant else ""
    return f"{workload}-{mode}{tail}.json"


def check_variant(text: str | None) -> str | None:
    if text is None:
        return None
    if not re.fullmatch(r"[A-Za-z0-9_.]{1,32}", text):
        raise UsageError(f"--variant '{text}': letters, digits, '_' and '.' only (at most 32), e.g. 1G")
    return text


def save(out_dir: Path, rs: ResultSet) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / file_name(rs.workload, rs.mode, rs.variant)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rs.to_json(), indent=1) + "\n")
    tmp.replace(path)
    return path


def earlier_runs(out_dir: Path, rs: ResultSet) -> list[dict]:
    """The runs already in out_dir's file for rs's workload, mode and variant (eval run --append);
    none when there is no file yet."""
    path = out_dir / file_name(rs.workload, rs.mode, rs.variant)
    if not path.exists():
        return []
    try:
        old = ResultSet.from_json(json.loads(path.read_text()), str(path))
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--append: cannot read {path}: {e}") from None
    if set(old.metrics) != set(rs.metrics):
        raise UsageError(f"--append: {path} holds other metrics ({', '.join(old.metrics)}); give another --out")
    return list(old.runs)


def load_dirs(dirs: list[Path]) -> list[ResultSet]:
    """Every result file in the directories (and their subdirectories, one level: ``eval plan``
    writes one per mode); a workload measured twice in the same column is refused."""
    found: list[ResultSet] = []
    seen: dict[tuple[str, str], Path] = {}
    for d in dirs:
        if not d.is_dir():
            raise UsageError(f"{d} is not a directory of eval results")
        files = sorted(list(d.glob("*.json")) + list(d.glob("*/*.json")))
        for f in files:
            if f.name.startswith("report"):
                continue
            try:
                doc = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise UsageError(f"cannot read {f}: {e}") from None
            if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
                continue  # not ours (a report written here under another name, notes): skipped
            rs = ResultSet.from_json(doc, str(f))
            key = (rs.workload, rs.column)
            if key in seen:
                raise UsageError(f"{rs.workload} in {rs.column} is in both {seen[key]} and {f}; give one of them")
            seen[key] = f
            found.append(rs)
    if not found:
        raise UsageError(f"no eval results in {', '.join(map(str, dirs))} (coreslice eval run --out DIR writes them)")
    return found
