"""The firmware memory map and the host's own System RAM.

/sys/firmware/memmap is the map the firmware handed to the host kernel (before ``mem=`` trimmed
it): what RAM exists.  /proc/iomem's top-level "System RAM" lines are what the host kernel uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coreslice.host.sysfs import read_text


@dataclass(frozen=True)
class Range:
    start: int
    end: int  # exclusive
    type: str = ""

    @property
    def size(self) -> int:
        return self.end - self.start

    def overlaps(self, start: int, end: int) -> bool:
        return self.start < end and start < self.end

    def contains(self, start: int, end: int) -> bool:
        return self.start <= start and end <= self.end

    def to_json(self) -> dict:
        return {"start": self.start, "end": self.end, "type": self.type}


def read_firmware_map(root: Path) -> list[Range]:
    base = root / "sys/firmware/memmap"
    out = []
    if not base.is_dir():
        return out
    for d in base.iterdir():
        start = read_text(root, f"sys/firmware/memmap/{d.name}/start")
        end = read_text(root, f"sys/firmware/memmap/{d.name}/end")
        typ = read_text(root, f"sys/firmware/memmap/{d.name}/type", "")
        if start is None or end is None:
            continue
        out.append(Range(int(start, 16), int(end, 16) + 1, typ or ""))
    return sorted(out, key=lambda r: r.start)


def parse_iomem(text: str) -> list[Range]:
    """Top-level /proc/iomem entries (no indentation)."""
    out = []
    for line in text.splitlines():
        if not line or line[0] == " ":
            continue
        span, _, name = line.partition(" : ")
        lo, _, hi = span.partition("-")
        out.append(Range(int(lo, 16), int(hi, 16) + 1, name.strip()))
    return out


def read_iomem(root: Path) -> list[Range]:
    return parse_iomem(read_text(root, "proc/iomem", "") or "")


def merge(ranges: list[Range], type_: str) -> list[Range]:
    """Coalesce adjacent ranges of one type (the firmware map splits RAM at arbitrary points)."""
    merged: list[Range] = []
    for r in sorted((r for r in ranges if r.type == type_), key=lambda r: r.start):
        if merged and merged[-1].end >= r.start:
            last = merged.pop()
            merged.append(Range(last.start, max(last.end, r.end), type_))
        else:
            merged.append(r)
    return merged


def subtract(ranges: list[Range], holes: list[Range]) -> list[Range]:
    """The parts of ``ranges`` outside every hole, in address order, keeping each range's type."""
    out: list[Range] = []
    for r in sorted(ranges, key=lambda r: r.start):
        pieces = [(r.start, r.end)]
        for h in holes:
            pieces = [p for s, e in pieces
                      for p in ((s, min(e, h.start)), (max(s, h.end), e)) if p[0] < p[1]]
        out += [Range(s, e, r.type) for s, e in pieces]
    return out


def intersect(ranges: list[Range], limits: list[Range]) -> list[Range]:
    """The parts of ``ranges`` inside some limit (limits must not overlap each other)."""
    out = [Range(max(r.start, l.start), min(r.end, l.end), r.type)
           for r in ranges for l in limits if r.overlaps(l.start, l.end)]
    return sorted(out, key=lambda r: r.start)
