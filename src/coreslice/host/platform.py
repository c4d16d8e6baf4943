"""Host-wide facts: boot id, TSC frequency, APIC mode, kernel log lines."""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
from pathlib import Path

from coreslice.host.sysfs import host_file_error, read_text

IA32_APIC_BASE = 0x1B       # Intel SDM Vol. 3A §11.4.4
APIC_BASE_EXTD = 1 << 10    # x2APIC mode enable (SDM Vol. 3A §11.12.1)
APIC_BASE_EN = 1 << 11

_TSC_LINES = (
    re.compile(r"tsc: Refined TSC clocksource calibration: (\d+)\.(\d+) MHz"),
    re.compile(r"tsc: Detected (\d+)\.(\d+) MHz processor"),
)


def read_lockdown(root: Path) -> str | None:
    """The kernel lockdown mode ("none", "integrity", "confidentiality"), from
    /sys/kernel/security/lockdown ("[none] integrity confidentiality": the selected one in
    brackets); None when the kernel has no lockdown LSM.  Under integrity or confidentiality
    (Secure Boot hosts) /dev/mem and MSR writes are refused."""
    text = read_text(root, "sys/kernel/security/lockdown")
    m = re.search(r"\[(\w+)\]", text or "")
    return m.group(1) if m else None


_RELEASE = re.compile(r"Linux version (\d+)\.(\d+)")


def kernel_version(root: Path, log: list[str]) -> tuple[int, int] | None:
    """(major, minor) of the running host kernel: /proc/sys/kernel/osrelease, else its log."""
    for text in (read_text(root, "proc/sys/kernel/osrelease") or "", *log[:50]):
        m = re.match(r"(\d+)\.(\d+)", text) or _RELEASE.search(text)
        if m:
            return int(m.group(1)), int(m.group(2))
    return None


def read_boot_id(root: Path) -> str:
    return read_text(root, "proc/sys/kernel/random/boot_id", "") or ""


def read_kernel_log(root: Path) -> list[str]:
    """Kernel log messages, from /dev/kmsg (live host) or a captured text file of it."""
    path = root / "dev/kmsg"
    lines: list[str] = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return lines
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):  # a captured tree's `dmesg` text
            with os.fdopen(os.dup(fd), "r", errors="replace") as f:
                raw = f.read().splitlines()
        elif not stat.S_ISCHR(mode):
            raise host_file_error(root, "dev/kmsg", "is neither the kernel log device nor a file of its text")
        else:
            raw = []
            while True:
                try:
                    rec = os.read(fd, 8192)
                except OSError as e:
                    if e.errno == errno.EPIPE:  # a record was overwritten while reading: go on
                        continue
                    break  # EAGAIN: end of the buffer
                if not rec:
                    break
                raw.append(rec.decode(errors="replace").rstrip("\n"))
    finally:
        os.close(fd)
    for rec in raw:
        # /dev/kmsg records: "prio,seq,usec,flags;message" (Documentation/ABI/testing/dev-kmsg)
        head, sep, msg = rec.partition(";")
        lines.append(msg if sep and "," in head else rec)
    return lines


def tsc_khz_from_log(lines: list[str]) -> int | None:
    for pattern in _TSC_LINES:
        for line in reversed(lines):
            m = pattern.search(line)
            if m:
                mhz, frac = m.groups()
                return int(mhz) * 1000 + int((frac + "000")[:3])
    return None


def read_apic_base_msr(root: Path, cpu: int = 0) -> int | None:
    """IA32_APIC_BASE of a CPU via the msr driver, or None when /dev/cpu/N/msr is not there."""
    try:
        fd = os.open(root / f"dev/cpu/{cpu}/msr", os.O_RDONLY | os.O_NONBLOCK)  # a FIFO would block
    except OSError:
        return None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISCHR(mode) or stat.S_ISREG(mode)):  # the device, or a captured file of it
            return None
        data = os.pread(fd, 8, IA32_APIC_BASE)
    except OSError:
        return None
    finally:
        os.close(fd)
    return struct.unpack("<Q", data)[0] if len(data) == 8 else None


def apic_mode_from_log(lines: list[str]) -> str | None:
    for line in reversed(lines):
        if "APIC: Switched APIC routing to" in line or "Switched APIC routing to" in line:
            return "x2apic" if "x2apic" in line else "xapic"
    for line in lines:
        if "x2apic enabled" in line or "Enabled x2apic" in line:
            return "x2apic"
    return None


def read_apic_mode(root: Path, log: list[str]) -> tuple[str | None, str]:
    """("x2apic"|"xapic"|None, where the answer came from)."""
    msr = read_apic_base_msr(root)
    if msr is not None:
        return ("x2apic" if msr & APIC_BASE_EXTD else "xapic"), "IA32_APIC_BASE MSR"
    mode = apic_mode_from_log(log)
    return mode, "kernel log" if mode else "unknown"
