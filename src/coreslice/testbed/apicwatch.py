"""A watch on the emulated host's own CPUs' local APICs, from outside, through QEMU's monitor.

Why: a crash-containment run hung with the host's CPU 0 idle in HLT (IF set) while its local
APIC had its timer vector 0xEC in service and 0xEC and 0x29 (virtio0's requests) pending: an EOI
that never reached the APIC, so PPR 0xE0 blocked every device interrupt and the host waited for
ever on a 9p reply QEMU had already given.  Linux never idles with an interrupt in service, so
this is the emulator's (TCG); issue 4's slice CPU that "stopped receiving timer interrupts for
good, idle in HLT" is the same picture.  Nothing from outside can clear an ISR bit, so the watch
only says it, at once and precisely, instead of letting the run reach its --timeout.
"""

from __future__ import annotations

import re
from collections.abc import Callable


def halted_cpus(info_cpus: str) -> set[int]:
    return {int(m) for m in re.findall(r"CPU #(\d+):[^\n]*\(halted\)", info_cpus)}


def vectors(info_lapic: str, reg: str) -> tuple[int, ...]:
    """The vectors listed on the ISR or IRR line of `info lapic` ("ISR\t 236", "(none)")."""
    m = re.search(rf"^{reg}\s+([^\n]*)$", info_lapic, re.M)
    if not m:
        return ()
    return tuple(int(v) for v in re.findall(r"\d+", m.group(1)))


def stuck(hmp: Callable[[str], str], cpus: list[int]) -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Host CPUs idle in HLT with a vector in service: cpu -> (ISR, IRR)."""
    halted = halted_cpus(hmp("info cpus"))
    out = {}
    for c in cpus:
        if c in halted:
            text = hmp(f"info lapic {c}")
            isr = vectors(text, "ISR")
            if isr:
                out[c] = (isr, vectors(text, "IRR"))
    return out


class Watch:
    """Looks every ``interval`` s; a CPU in the same stuck state at two looks is reported once."""

    def __init__(self, interval: float = 30.0):
        self.interval = interval
        self.next_at = 0.0
        self.seen: dict[int, tuple] = {}
        self.events: list[str] = []
        self._said: set[int] = set()

    def poll(self, now: float, hmp: Callable[[str], str], cpus: list[int]) -> list[str]:
        if now < self.next_at or not cpus:
            return []
        self.next_at = now + self.interval
        found = stuck(hmp, cpus)
        said = []
        for c, (isr, irr) in found.items():
            if self.seen.get(c) == (isr, irr) and c not in self._said:
                said.append(f"host CPU {c} idles in HLT with vector(s) {', '.join(f'0x{v:x}' for v in isr)} in service "
                            f"(pending: {', '.join(f'0x{v:x}' for v in irr) or 'none'}): an EOI the emulator lost; "
                            "the host takes no interrupt below it from now on")
                self._said.add(c)
        self.seen = found
        self.events += said
        return said
