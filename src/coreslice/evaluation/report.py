"""``coreslice eval report``: per workload metric and mode, the median of the repeats, their
spread, and the ratio to native (higher is better: for a latency the ratio is native / mode), with
the prototype's hardware figures alongside as reference columns.  Pure, except ``plot``, which
draws with matplotlib (its Agg backend: no display needed).
"""

from __future__ import annotations

import html
import statistics
from dataclasses import dataclass

from coreslice.evaluation.results import ResultSet

# The prototype's results on a 2x12-core Xeon, relative to native in percent (its README):
# the slice, a VM on 1 GiB EPT pages, a VM on 2 MiB pages.  Keys are this report's rows; the
# data serving figure (YCSB-A on Cassandra) has no built-in workload and is shown as reference only.
REFERENCE_COLUMNS = ("slice", "vm-1G", "vm-2M")
REFERENCE = {
    "graph": ("graph analytics", (100.5, 88.8, 90.3)),
    "kv.peak_ops_per_s": ("data caching, peak throughput", (97.9, 96.8, 98.5)),
    "kv.max_load_p95_10ms_ops_per_s": ("data caching, max load with p95 < 10 ms", (100.0, 93.0, 94.3)),
    "data-serving": ("data serving (YCSB-A; no built-in workload)", (103.0, 88.6, 88.1)),
}
COLUMN_ORDER = ("native", "slice", "vm")


@dataclass(frozen=True)
class Cell:
    median: float
    min: float
    max: float
    n: int
    relative_to_native: float | None

    @property
    def spread(self) -> float:
        """(max - min) / median: how far apart the repeats are."""
        return (self.max - self.min) / self.median if self.median else 0.0

    def to_json(self) -> dict:
        return {"median": self.median, "min": self.min, "max": self.max, "n": self.n,
                "spread": round(self.spread, 6), "relative_to_native": self.relative_to_native}


@dataclass
class Row:
    key: str                 # report.json's key: the workload, or WORKLOAD.METRIC when it has several
    workload: str
    metric: str
    unit: str
    higher_is_better: bool
    cells: dict[str, Cell]   # column (mode[-variant]) -> figures


def _column_key(col: str) -> tuple[int, str]:
    mode = col.split("-", 1)[0]
    return (COLUMN_ORDER.index(mode) if mode in COLUMN_ORDER else len(COLUMN_ORDER), col)


def build(sets: list[ResultSet]) -> tuple[list[Row], list[str]]:
    """The report's rows (in workload order of first appearance) and columns (native, slice,
    then VMs)."""
    by_workload: dict[str, list[ResultSet]] = {}
    for rs in sets:
        by_workload.setdefault(rs.workload, []).append(rs)
    columns = sorted({rs.column for rs in sets}, key=_column_key)
    rows = []
    for workload, group in by_workload.items():
        metrics: dict[str, dict] = {}
        for rs in group:
            for name, meta in rs.metrics.items():
                metrics.setdefault(name, meta)
        for name, meta in metrics.items():
            hib = bool(meta.get("higher_is_better", True))
            medians: dict[str, list[float]] = {rs.column: rs.values(name) for rs in group if rs.values(name)}
            native = statistics.median(medians["native"]) if "native" in medians else None
            cells = {}
            for col, vals in medians.items():
                med = statistics.median(vals)
                rel = None
                if native is not None and native > 0:
                    if hib:
                        rel = med / native  # 0 stays 0: a mode that reached nothing is not "missing"
                    elif med > 0:
                        rel = native / med
                cells[col] = Cell(med, min(vals), max(vals), len(vals), None if rel is None else round(rel, 6))
            key = workload if len(metrics) == 1 else f"{workload}.{name}"
            rows.append(Row(key, workload, name, str(meta.get("unit", "")), hib, cells))
    return rows, columns


def emulated(sets: list[ResultSet]) -> bool:
    return any(rs.environment.get("emulated") for rs in sets)


def to_json(rows: list[Row], columns: list[str], sets: list[ResultSet]) -> dict:
    return {
        "report": {r.key: {col: r.cells[col].to_json() for col in columns if col in r.cells} for r in rows},
        "units": {r.key: {"unit": r.unit, "higher_is_better": r.higher_is_better} for r in rows},
        "reference_percent_of_native": {k: dict(zip(REFERENCE_COLUMNS, v)) | {"what": what}
                                        for k, (what, v) in REFERENCE.items()},
        "emulated": emulated(sets),
        "note": NOTE_EMULATED if emulated(sets) else NOTE_HARDWARE,
    }


NOTE_EMULATED = ("measured on an emulated machine (QEMU TCG): these figures check that every mode runs, "
                 "they are not performance claims")
NOTE_HARDWARE = "relative to native: higher is better (a latency's ratio is native / mode)"


def _fmt(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def _pct(rel: float | None) -> str:
    return "-" if rel is None else f"{rel * 100:.1f}%"


def text(rows: list[Row], columns: list[str], sets: list[ResultSet]) -> str:
    head = ["workload", "unit"] + [f"{c} median (range) vs native" for c in columns] + \
           [f"ref {c}" for c in REFERENCE_COLUMNS]
    lines = []
    for r in rows:
        cells = []
        for c in columns:
            cell = r.cells.get(c)
            cells.append("-" if cell is None else
                         f"{_fmt(cell.median)} ({_fmt(cell.min)}-{_fmt(cell.max)}, n={cell.n})"
                         + ("" if c == "native" else f" {_pct(cell.relative_to_native)}"))
        ref = REFERENCE.get(r.key, (None, (None,) * 3))[1]
        lines.append([r.key, r.unit + ("" if r.higher_is_better else " (lower is better)"), *cells,
                      *("-" if v is None else f"{v}%" for v in ref)])
    for key, (what, ref) in REFERENCE.items():
        if key not in {r.key for r in rows}:
            lines.append([key, f"reference only: {what}", *("-" for _ in columns), *(f"{v}%" for v in ref)])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    out = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *lines]]
    out.append("")
    out.append(("note: " + NOTE_EMULATED) if emulated(sets) else ("note: " + NOTE_HARDWARE))
    out.append("ref: the prototype's hardware figures (2x12-core Xeon), percent of native")
    return "\n".join(out) + "\n"


def html_page(rows: list[Row], columns: list[str], sets: list[ResultSet], plot_file: str | None = None) -> str:
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in ["workload", "unit", *columns, *(f"ref {c}" for c in REFERENCE_COLUMNS)])
    body = []
    for r in rows:
        tds = [f"<td>{e(r.key)}</td>", f"<td>{e(r.unit)}{'' if r.higher_is_better else ' (lower is better)'}</td>"]
        for c in columns:
            cell = r.cells.get(c)
            if cell is None:
                tds.append("<td>-</td>")
            else:
                rel = "" if c == "native" else f"<br><b>{e(_pct(cell.relative_to_native))}</b>"
                tds.append(f"<td>{e(_fmt(cell.median))}<br><small>{e(_fmt(cell.min))} - {e(_fmt(cell.max))}, "
                           f"n={cell.n}</small>{rel}</td>")
        ref = REFERENCE.get(r.key, (None, (None,) * 3))[1]
        tds += [f"<td>{'-' if v is None else e(f'{v}%')}</td>" for v in ref]
        body.append("<tr>" + "".join(tds) + "</tr>")
    note = NOTE_EMULATED if emulated(sets) else NOTE_HARDWARE
    img = f'<p><img src="{e(plot_file)}" alt="relative to native"></p>' if plot_file else ""
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>coreslice eval report</title>"
            "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:4px 8px;"
            "text-align:right}td:first-child{text-align:left}</style></head><body>\n"
            f"<h1>coreslice eval report</h1>\n<p>{e(note)}</p>\n<table><tr>{head}</tr>\n" + "\n".join(body) +
            "</table>\n<p>ref: the prototype's hardware figures (2x12-core Xeon), percent of native.</p>\n"
            f"{img}\n</body></html>\n")


def plot(rows: list[Row], columns: list[str], sets: list[ResultSet], path) -> None:
    """Slice and VM relative to native per workload metric, as grouped bars (percent), with the
    prototype's figures as markers where it has them."""
    import os
    import tempfile
    config = os.path.expanduser("~/.config")
    if "MPLCONFIGDIR" not in os.environ and not os.access(config if os.path.isdir(config) else
                                                          os.path.expanduser("~"), os.W_OK):
        # A read-only home (the emulated host's): a cache of our own rather than a warning.
        os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="coreslice-mpl-")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [c for c in columns if c != "native"]
    shown = [r for r in rows if any(r.cells.get(c) and r.cells[c].relative_to_native is not None for c in others)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * max(1, len(shown))), 4.5))
    width = 0.8 / max(1, len(others))
    for i, col in enumerate(others):
        xs, ys = [], []
        for j, r in enumerate(shown):
            cell = r.cells.get(col)
            if cell and cell.relative_to_native is not None:
                xs.append(j + (i - (len(others) - 1) / 2) * width)
                ys.append(cell.relative_to_native * 100)
        ax.bar(xs, ys, width, label=col)
    # The prototype's figure for a column sits on that column's bar (a plain "vm" takes 1G's).
    ref_at = {"slice": "slice", "vm-1G": "vm-1G" if "vm-1G" in others else "vm", "vm-2M": "vm-2M"}
    label = "prototype (hardware)"
    for j, r in enumerate(shown):
        for ref_col, value in zip(REFERENCE_COLUMNS, REFERENCE.get(r.key, ("", ()))[1]):
            col = ref_at[ref_col]
            if col in others:
                x = j + (others.index(col) - (len(others) - 1) / 2) * width
                ax.scatter([x], [value], marker="_", s=300, color="black", zorder=3, label=label)
                label = None
    ax.axhline(100, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(shown)), [r.key for r in shown], rotation=20, ha="right")
    ax.set_ylabel("percent of native (higher is better)")
    ax.set_title("coreslice eval" + (": emulated machine, not performance claims" if emulated(sets) else ""))
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
