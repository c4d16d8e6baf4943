"""End to end: a slice that panics, halts, powers off or reboots leaves the host running.

One emulated machine (q35, TCG, `-no-reboot`, 7 CPUs) with four slices (the reboot and panic
ones with two CPUs, so that stopping the other CPU sends IPIs), booted one after the other with
the stock Debian kernel; each reports from user space and then ends itself
(coreslice.after=, testbed/initramfs.py SLICE_INIT): halt -f, poweroff -f, reboot -f, and a
sysrq panic (last: a panicked CPU spins, which slows TCG for whoever boots after it).

On hardware each of a stock kernel's reset methods resets the whole machine; the emulated one is
as strict: QEMU resets the VM on a triple fault, 0xFE to port 0x64, the CF9 reset or a jump to
the BIOS reset code, and `-no-reboot` turns that reset into QEMU exiting.  An escaped reset
therefore ends the run early: QEMU gone before the host job ended ("QEMU exited ... before the
host job ended"), host commands never run.  That is what the assertions on the host's error,
job_finished and the host commands' output catch.  Timing: about 2-3 minutes under TCG on 2 cores.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from coreslice.testbed.interrupts import totals
from coreslice.testbed.run import RunOptions, run

pytestmark = pytest.mark.e2e

# (action, coreslice boot arguments, what the slice's kernel prints when it gets there)
SLICES = [
    ("halt", "--cpus 1 --memory 256M@0x40000000 --console io:0x2f8", "reboot: System halted"),
    ("poweroff", "--cpus 2 --memory 256M@0x50000000", "reboot: Power down"),
    ("reboot", "--cpus 3-4 --memory 256M@0x60000000", "reboot: Restarting system"),
    ("panic", "--cpus 5-6 --memory 256M@0x100000000", "Kernel panic - not syncing: sysrq triggered crash"),
]

# Host command: what each slice's EFI stubs recorded (boot/efi.py status record, at the plan's
# layout.efi_status), read through /dev/mem with mmap (read() fails above mem=: DESIGN.md §3).
READ_EFI_STATUS = r"""python3 - slice-*.stdout <<'EOF'
import json, mmap, os, sys
from coreslice.boot.efi import STATUS_SIZE, read_status
for path in sorted(sys.argv[1:]):
    addr = json.load(open(path))["plan"]["layout"]["efi_status"]
    page = addr & ~0xFFF
    fd = os.open("/dev/mem", os.O_RDONLY)
    with mmap.mmap(fd, 0x1000, mmap.MAP_SHARED, mmap.PROT_READ, offset=page) as m:
        st = read_status(m[addr - page:addr - page + STATUS_SIZE])
    os.close(fd)
    print(json.dumps({"file": path, **(st.to_json() if st else {"missing": True})}))
EOF"""


RESTART_ALL = r"""for n in $(coreslice list --json | python3 -c 'import json,sys; print(" ".join(s["name"] for s in json.load(sys.stdin)["slices"]))'); do
  coreslice restart "$n" --json > "restart-$n.json" 2> "restart-$n.err" || { echo "restart $n failed"; cat "restart-$n.err"; continue; }
  coreslice console "$n" --wait CORESLICE-REPORT --timeout 120 > "console-$n.txt" 2>&1 && echo "back $n" || echo "not back $n"
done"""

# What `coreslice status` must say of each slice once it has done its action.
STATES = {"halt": ("halted", "halt"), "poweroff": ("halted", "poweroff"), "reboot": ("halted", "reboot"),
          "panic": ("panicked", None)}


@pytest.fixture
def run_dir(request):
    from coreslice.testbed.paths import cache_dir
    return cache_dir() / "test-runs" / f"{request.node.name}-{time.strftime('%H%M%S')}-{os.getpid()}"


def test_panic_halt_poweroff_reboot_stay_in_the_slice(run_dir):
    t0 = time.monotonic()
    r = run(RunOptions(
        slices=[f"{args} --cmdline coreslice.after={action}" for action, args, _ in SLICES],
        host_cmds=[
            "sleep 5; cat /proc/uptime",  # after every slice's action: the host still runs
            "cat /proc/interrupts",
            "coreslice list --json",
            READ_EFI_STATUS,
            "coreslice status --json",
            # Each slice comes back with a restart: its user space reports again (read from its
            # RAM), before it does its coreslice.after= action once more.
            RESTART_ALL,
        ],
        smp=7, wait_each=True, timeout=900, workdir=run_dir,
    ))
    host = r["host"]
    # The machine is as strict as hardware about resets, and nothing escaped: the host ran its
    # job to the end and powered itself off.
    assert "-no-reboot" in host["qemu_command"]
    assert host["error"] is None, f"host failed (a slice reset or hung the machine?): {host['error']}"
    assert host["job_finished"] and host["qemu_exit_code"] == 0
    host_log = Path(host["console_log"]).read_text(errors="replace")
    assert "Kernel panic" not in host_log and "reboot: Restarting" not in host_log

    for (action, _, mark), s in zip(SLICES, r["slices"]):
        assert s["exit_code"] == 0, s["stderr"]
        assert s["booted"], f"{action} slice did not reach user space; console: {s['console_log']}"
        assert "reboot=efi" in s["cmdline"] and "panic=0" in s["cmdline"]
        log = Path(s["console_log"]).read_text(errors="replace")
        assert "efi: EFI v2.10 by coreslice" in log, f"{action}: not booted as an EFI kernel"
        assert f"coreslice-after: {action}" in log
        assert mark in log, f"{action} slice never got to '{mark}'; console: {s['console_log']}"
        assert "Unable to switch EFI into virtual mode" not in log

    uptime, irqs, listing, status, states, restarts = r["host_cmds"]
    assert uptime["exit_code"] == 0 and float(uptime["output"].split()[0]) > 0
    assert listing["exit_code"] == 0, listing["output"]
    names = {s["name"] for s in json.loads(listing["output"])["slices"]}
    assert len(names) == len(SLICES)
    assert status["exit_code"] == 0, status["output"]
    records = [json.loads(line) for line in status["output"].splitlines() if line.startswith("{")]
    by_action = {a: rec for (a, _, _), rec in zip(SLICES, records)}
    assert len(records) == len(SLICES)
    # Every slice ran its EFI runtime (SetVirtualAddressMap once); reboot and poweroff ended in
    # ResetSystem, whose CPU is now parked; halt and panic never called it.
    assert all(rec["svam_calls"] == 1 for rec in records), records
    assert by_action["reboot"]["reset_calls"] == 1 and by_action["reboot"]["reset_type"] == "cold"
    assert by_action["poweroff"]["reset_calls"] == 1 and by_action["poweroff"]["reset_type"] == "shutdown"
    assert by_action["halt"]["reset_calls"] == 0 and by_action["panic"]["reset_calls"] == 0

    # status names what each slice did, from its kernel log in its RAM.
    assert states["exit_code"] == 0, states["output"]
    docs = json.loads(states["output"])["slices"]
    by_name = {d["name"]: d for d in docs}
    for (action, _, _), s in zip(SLICES, r["slices"]):
        d = by_name[s["output"]["slice"]["name"]]
        state, reason = STATES[action]
        assert d["state"] == state, (action, d)
        if reason:
            assert d["reason"] == reason, (action, d)
        assert d["kernel_release"] == host["kernel_release"]
    # and a restart brings each one back to user space
    assert restarts["exit_code"] == 0, restarts["output"]
    assert sorted(line for line in restarts["output"].splitlines() if line.startswith("back ")) == \
        sorted(f"back {n}" for n in by_name), restarts["output"]

    # No IPI reached the host's CPU, from boot to 5 s after the last action: stopping the
    # slices' other CPUs (REBOOT_VECTOR, then NMI) went to those CPUs alone (no_ipi_broadcast=1).
    before = host["interrupts_before"]
    for after in (host["interrupts_after"], totals(irqs["output"])):
        for row in ("CAL", "RES", "TLB", "NMI"):
            assert after[row] == before[row], f"host {row} IPIs went {before[row]} -> {after[row]}"
    print(f"crash containment run: {time.monotonic() - t0:.0f} s")
