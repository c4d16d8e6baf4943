"""What a user asks for when booting a slice, before it is checked against the host."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class BootSpec:
    kernel: Path
    initrd: Path | None
    cpus: list[int]
    mem_size: int
    mem_base: int
    console: str
    cmdline: str = ""
    tsc_khz: int | None = None
    earlyprintk: bool = False
    devices: list[str] = field(default_factory=list)  # PCI functions (--device), as given
    extra: dict = field(default_factory=dict)
    name: str | None = None  # the slice's name in the ledger; default slice-<first CPU>
