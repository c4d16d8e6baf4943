"""Small helpers to read kernel files under a root directory."""

from __future__ import annotations

import os
from pathlib import Path


def read_text(root: Path, rel: str, default: str | None = None) -> str | None:
    try:
        return (root / rel.lstrip("/")).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return default


def read_bytes(root: Path, rel: str) -> bytes | None:
    try:
        return (root / rel.lstrip("/")).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def parse_cpu_list(text: str) -> list[int]:
    """Parse the kernel's CPU list format ("0-3,5,7-8")."""
    out: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return out


def format_cpu_list(cpus: list[int]) -> str:
    """Inverse of parse_cpu_list, compressing runs."""
    cpus = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        parts.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(parts)


def link_name(path: Path) -> str | None:
    """Last component of a symlink's target (e.g. a device's ``driver``), even when the target is
    not there (captured trees keep the link, not the whole driver directory)."""
    try:
        return os.readlink(path).rstrip("/").rsplit("/", 1)[-1]
    except OSError:
        return None
