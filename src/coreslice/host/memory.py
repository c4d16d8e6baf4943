"""The firmware memory map and the host's own System RAM.

/sys/firmware/memmap is the map the firmware handed to the host kernel (before ``mem=`` trimmed
it): what RAM exists.  /proc/iomem's top-level "System RAM" lines are what the host kernel uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coreslice.host.sysfs import host_file_error, parse_int, read_text


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
        rel = f"sys/firmware/memmap/{d.name}"
        start = read_text(root, f"{rel}/start")
        end = read_text(root, f"{rel}/end")
        typ = read_text(root, f"{rel}/type", "")
        if start is None or end is None:
            continue
        out.append(_range(root, rel, _hex(root, f"{rel}/start", start), _hex(root, f"{rel}/end", end), typ or ""))
    return sorted(out, key=lambda r: r.start)


def _hex(root: Path, rel: str, text: str) -> int:
    try:
        return parse_int(text, 16)
    except ValueError as e:
        raise host_file_error(root, rel, f"not a memory address ({e})") from None


def _range(root: Path, rel: str, lo: int, hi: int, typ: str) -> Range:
    """lo-hi (inclusive) as a Range; one line naming ``rel`` when it is none."""
    if hi < lo or hi >= 1 << 64:
        raise host_file_error(root, rel, f"not a memory range (0x{lo:x}-0x{hi:x})")
    return Range(lo, hi + 1, typ)


def parse_iomem(text: str, root: Path = Path("/"), rel: str = "proc/iomem") -> list[Range]:
    """Top-level /proc/iomem (or /proc/ioports) entries (no indentation); ``root`` and ``rel``
    name the file in the error for a line that is not a range."""
    out = []
    for line in text.splitlines():
        if not line or line[0] == " ":
            continue
        span, _, name = line.partition(" : ")
        lo, _, hi = span.partition("-")
        out.append(_range(root, rel, _hex(root, rel, lo), _hex(root, rel, hi), name.strip()))
    return out


def read_iomem(root: Path) -> list[Range]:
    return parse_iomem(read_text(root, "proc/iomem", "") or "", root)


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
