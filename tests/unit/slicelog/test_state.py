"""The state rule `coreslice status` and the watcher share (slicelog/state.py)."""

import pytest

from coreslice.slicelog.state import STATES, decide

BOOT = ["Linux version 6.12.38+deb12-amd64", "Command line: console=ttyS1", "Run /init as init process"]


@pytest.mark.parametrize("ledger, log, unreadable, want", [
    ("reserved", None, None, ("launching", None)),
    ("launching", None, None, ("launching", None)),
    ("stopped", None, None, ("stopped", None)),
    ("replaced", None, None, ("stopped", None)),
    ("ended", None, None, ("stopped", None)),
    ("running", BOOT, None, ("running", None)),
    ("running", BOOT + ["Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)",
                        "---[ end Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0) ]---"],
     None, ("panicked", "VFS: Unable to mount root fs on unknown-block(0,0)")),
    ("running", BOOT + ["reboot: System halted"], None, ("halted", "halt")),
    ("running", BOOT + ["reboot: Power down"], None, ("halted", "poweroff")),
    ("running", BOOT + ["reboot: Restarting system"], None, ("halted", "reboot")),
    ("running", None, "no VMCOREINFO note in the slice's RAM yet", ("unknown", "no VMCOREINFO note in the slice's RAM yet")),
    ("running", None, None, ("unknown", "the slice's log was not read")),
    ("weird", None, None, ("unknown", "the ledger records state 'weird', which this coreslice does not know")),
])
def test_decide(ledger, log, unreadable, want):
    assert decide(ledger, log, unreadable) == want
    assert want[0] in STATES


def test_failed_carries_the_launch_error():
    assert decide("failed", error="read-back differs") == ("failed", "read-back differs")


def test_a_stopped_row_is_stopped_whatever_its_old_log_says():
    assert decide("stopped", ["Kernel panic - not syncing: x"]) == ("stopped", None)


def test_the_last_verdict_in_the_log_wins():
    assert decide("running", ["reboot: Restarting system", "Kernel panic - not syncing: late"]) == ("panicked", "late")
