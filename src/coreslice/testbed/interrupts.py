"""Parse ``/proc/interrupts`` into rows with per-CPU counts and totals.

Rows are keyed by their label without the colon: numbers for device IRQs (``"4"``), names for
the architecture's counters (``"CAL"`` function-call IPIs, ``"RES"`` rescheduling IPIs,
``"TLB"`` shootdowns, ``"LOC"`` local timer, ...).  ``ERR``/``MIS`` carry one total only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InterruptRow:
    label: str
    counts: tuple[int, ...]
    description: str

    @property
    def total(self) -> int:
        return sum(self.counts)


def parse_interrupts(text: str) -> dict[str, InterruptRow]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return {}
    ncpu = len([c for c in lines[0].split() if c.startswith("CPU")])
    rows: dict[str, InterruptRow] = {}
    for line in lines[1:]:
        if ":" not in line:
            continue
        label, rest = line.split(":", 1)
        label = label.strip()
        fields = rest.split()
        counts: list[int] = []
        for f in fields[: max(ncpu, 1)]:
            if not f.isdigit():
                break
            counts.append(int(f))
        desc = " ".join(fields[len(counts):])
        rows[label] = InterruptRow(label, tuple(counts), desc)
    return rows


def totals(text: str) -> dict[str, int]:
    """``{label: total over CPUs}`` for every row."""
    return {label: row.total for label, row in parse_interrupts(text).items()}
