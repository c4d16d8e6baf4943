"""What state a slice is in, from its ledger row and its kernel log: a pure rule, shared by
`coreslice status` and the watcher.

The log lines matched are the kernel's own (kernel/panic.c panic(), kernel/reboot.c
kernel_halt/kernel_power_off/kernel_restart_prepare via "reboot: " pr_fmt).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

STATES = ("launching", "running", "panicked", "halted", "stopped", "failed", "unknown")

_LEDGER = {"reserved": "launching", "launching": "launching", "stopped": "stopped", "replaced": "stopped",
           "ended": "stopped", "failed": "failed"}
PANIC = re.compile(r"Kernel panic - not syncing(?::\s*(.*?))?(?:\s*\]---)?\s*$")
HALTS = {"reboot: System halted": "halt", "reboot: Power down": "poweroff", "reboot: Restarting system": "reboot"}
# EFI ResetSystem's ResetType (UEFI 2.10 §8.5.1, boot/efi.py RESET_TYPES) as a halt reason.
RESETS = {"shutdown": "poweroff", "cold": "reboot", "warm": "reboot", "platform-specific": "reboot"}


def decide(ledger_state: str | None, log: Iterable[str] | None = None, unreadable: str | None = None,
           error: str | None = None, efi_reset: str | None = None) -> tuple[str, str | None]:
    """(state, reason) of one slice.

    ``ledger_state`` is the row's state; ``log`` the texts of its kernel's records, oldest first
    (read only for a running row); ``unreadable`` why the log could not be read; ``error`` the
    row's recorded error (the reason of a failed launch); ``efi_reset`` the ResetType the slice's
    EFI ResetSystem stub recorded, if it was called.  That record decides first: the CPU that
    called it is parked for good, whatever the log holds or whether it can be read (its last lines
    may not have reached the ring).  Else the last panic or halt line in the log decides; a running
    row whose log cannot be read is unknown, with that reason."""
    mapped = _LEDGER.get(ledger_state or "")
    if mapped == "failed":
        return "failed", error
    if mapped is not None:
        return mapped, None
    if ledger_state != "running":
        return "unknown", f"the ledger records state {ledger_state!r}, which this coreslice does not know"
    if efi_reset is not None:
        return "halted", RESETS.get(efi_reset, "reboot")
    if unreadable is not None:
        return "unknown", unreadable
    if log is None:
        return "unknown", "the slice's log was not read"
    verdict: tuple[str, str | None] = ("running", None)
    for text in log:
        m = PANIC.search(text)
        if m:
            verdict = ("panicked", m.group(1) or "Kernel panic - not syncing")
            continue
        for line, why in HALTS.items():
            if line in text:
                verdict = ("halted", why)
    return verdict
