"""``coreslice demo``: an emulated host boots two slices at once, and you watch both consoles.

The demo is the testbed with a fixed scenario: a 4-CPU, 6 GiB q35 machine whose host Linux keeps
CPU 0 and 1 GiB; slice A gets CPUs 1-2 and 512 MiB at 1 GiB, slice B gets CPU 3 and 1 GiB above
4 GiB; each slice's console is a PCI UART on a root bus of its own.  While it runs, every line the slices print on their UARTs is shown, prefixed by the slice.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

# Each slice's console is a PCI UART alone on a PCI root bus of its own (the testbed's default),
# so the slice's DSDT exposes that root bus and nothing of the host's.
SLICES = (
    ("A", "--name A --cpus 1-2 --memory 512M@0x40000000 --console 0000:21:00.0", "console-pxb1.log"),
    ("B", "--name B --cpus 3 --memory 1G@0x100000000 --console 0000:41:00.0", "console-pxb2.log"),
)


class ConsoleTail(threading.Thread):
    """Print new lines of the slices' console logs as they appear."""

    def __init__(self, run_dir: Path, out=sys.stdout):
        super().__init__(daemon=True)
        self.files = [(name, run_dir / log) for name, _, log in SLICES]
        self.out = out
        self.stop = threading.Event()

    def run(self) -> None:
        pos = {name: 0 for name, _ in self.files}
        partial = {name: "" for name, _ in self.files}
        while True:
            stopping = self.stop.is_set()
            for name, path in self.files:
                try:
                    with open(path, "rb") as f:
                        f.seek(pos[name])
                        data = f.read()
                except FileNotFoundError:
                    continue
                pos[name] += len(data)
                text = partial[name] + data.decode(errors="replace").replace("\r", "")
                *lines, partial[name] = text.split("\n")
                for line in lines:
                    print(f"[slice {name}] {line}", file=self.out, flush=True)
            if stopping:
                return
            time.sleep(0.2)


def format_table(result: dict) -> str:
    rows = [("slice", "args", "booted", "cpus", "apic ids", "MemTotal", "to user space")]
    for (name, _, _), s in zip(SLICES, result.get("slices", [])):
        mem = f"{s['mem_kib'] // 1024} MiB" if s.get("mem_kib") else "-"
        secs = f"{s['seconds_to_userspace']:.1f} s" if s.get("seconds_to_userspace") else "-"
        apic = ",".join(map(str, s.get("apic_ids") or [])) or "-"
        args = " ".join(a for a in s.get("args", [])[2:6])
        rows.append((name, args, "yes" if s.get("booted") else "NO", str(s.get("cpus") or "-"), apic, mem, secs))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
    before, after = result["host"].get("interrupts_before") or {}, result["host"].get("interrupts_after") or {}
    ipis = ", ".join(f"{k} +{after.get(k, 0) - before.get(k, 0)}" for k in ("CAL", "RES", "TLB") if k in before)
    if ipis:
        table += f"\nIPIs received by the host while the slices booted and ran: {ipis}"
    return table
