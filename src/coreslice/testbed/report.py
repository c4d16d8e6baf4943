"""What a testbed slice tells the outside: its one report line, and the files of its data path.

The slice initramfs (initramfs.py) writes ``CORESLICE-REPORT ...`` to its kernel log; the run
watcher (run.py) and the whole-machine boot (qemu.py) read it back with :func:`parse_report`.
"""

from __future__ import annotations

import re

REPORT_TAG = "CORESLICE-REPORT"
DATA_FILE = "hello.txt"  # the known file in every slice disk image (datapath.py)
RESULT_FILE = "result.txt"  # what a slice writes into its image
RESULT_PREFIX = "coreslice-result"


_REPORT_RE = re.compile(
    re.escape(REPORT_TAG)
    + r" cpus=(?P<cpus>\d+) mem_kib=(?P<mem>\d+) apic_ids=(?P<apic>[0-9,]*)"
    + r"(?: pci=(?P<pci>[0-9a-f:.,]*))?"
    + r"(?: kcode=(?P<kcode>[0-9a-f]+|-))?"
    + r"(?: storage_read=(?P<sread>\S*) storage_written=(?P<swritten>[01]))?"
    + r"(?: ping_ok=(?P<ping>[01]) rtt_ms=(?P<rtt>[0-9.]+|-))?"
    + r"(?: dma_own=(?P<dmaown>[01-]) dma_host=(?P<dmahost>blocked|leaked|-))?"
    + r" cmdline=(?P<cmdline>.*)$"
)


def parse_report(line: str) -> dict | None:
    """Parse a ``CORESLICE-REPORT`` line (anywhere in ``line``); None if there is none.

    Returns ``{"cpus": int, "mem_kib": int, "apic_ids": [int, ...], "pci": [str, ...], "cmdline": str}``
    (``pci``: the PCI functions in the slice's sysfs), plus, when the slice ran the data path,
    ``"storage": {"read": str | None, "written": bool}`` and
    ``"network": {"ping_ok": bool, "rtt_ms": float | None}``, and when it ran the DMA probe
    (dmaprobe.py) ``"dma": {"own": bool | None, "host": "blocked" | "leaked" | None}``
    (None: the probe could not tell).
    """
    m = _REPORT_RE.search(line.rstrip("\r\n").replace("\r", ""))
    if not m:
        return None
    out = {
        "cpus": int(m["cpus"]),
        "mem_kib": int(m["mem"]),
        "apic_ids": [int(a) for a in m["apic"].split(",") if a],
        "pci": [a for a in (m["pci"] or "").split(",") if a],
        "cmdline": m["cmdline"].strip(),
        # physical start of "Kernel code" in the slice's /proc/iomem (None if not reported)
        "kernel_code": int(m["kcode"], 16) if m["kcode"] not in (None, "-") else None,
    }
    if m["swritten"] is not None:
        out["storage"] = {"read": None if m["sread"] in ("", "-") else m["sread"],
                          "written": m["swritten"] == "1"}
    if m["ping"] is not None:
        out["network"] = {"ping_ok": m["ping"] == "1",
                          "rtt_ms": None if m["rtt"] == "-" else float(m["rtt"])}
    if m["dmaown"] is not None:
        out["dma"] = {"own": None if m["dmaown"] == "-" else m["dmaown"] == "1",
                      "host": None if m["dmahost"] == "-" else m["dmahost"]}
    return out


def find_report(text: str) -> dict | None:
    """The first report line in a console log's text."""
    for line in text.splitlines():
        if REPORT_TAG in line:
            r = parse_report(line)
            if r is not None:
                return r
    return None




# Where a kernel log says it is in trouble: an oops or warning ("cut here" opens both), a BUG, a
# panic, an RCU stall, a soft or hard lockup, a hung task.
_TROUBLE_RE = re.compile(
    r"-+\[ cut here \]-+|\bBUG:|\bWARNING:|Kernel panic|\bOops\b|rcu: INFO|rcu_\w+ detected stall"
    r"|watchdog: BUG|soft lockup|hard LOCKUP|blocked for more than|Call Trace:"
)


def first_trouble(log: str, lines: int = 60) -> str:
    """The first trouble block of a kernel log (from its first line matching an oops, warning,
    panic, stall or lockup, ``lines`` lines), or "" when there is none: the part a test's failure
    message must show, since the log's tail is often only what came after."""
    rows = log.replace("\r", "").splitlines()
    for i, row in enumerate(rows):
        if _TROUBLE_RE.search(row):
            return "\n".join(rows[max(0, i - 3): i + lines])
    return ""
