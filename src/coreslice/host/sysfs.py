"""Small helpers to read kernel files under a root directory.

A root other than / is a captured tree (scripts/capture-host.sh), which anyone can edit or
damage: what cannot be read or parsed there ends as one UsageError line naming the file.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from coreslice.acpi.errors import AcpiFormatError
from coreslice.errors import UsageError

# The largest CPU number a list may name.  Linux's NR_CPUS is at most 8192 on x86 (MAXSMP) and
# x2APIC IDs are 32-bit, but no machine has more than a few thousand logical CPUs: 65535 is far
# beyond any real list, and bounds what a typo like 1-4000000000 would allocate.
MAX_CPU = 65535
_NUMBER = re.compile(r"[0-9]+")  # ASCII digits only: int() also takes "+1", "1_0" and "١"


class HostFileError(UsageError):
    """A file of the host (or of a captured tree) cannot be read or is not in the kernel's format."""


def host_file_error(root: Path, rel: str, problem: str) -> HostFileError:
    path = Path(root) / rel.lstrip("/")
    fix = ("this kernel file is not in the format coreslice knows; report it with the file's contents"
           if Path(root) == Path("/") else
           "repair that file or capture the host tree again (scripts/capture-host.sh)")
    return HostFileError(f"{path}: {problem}; {fix}")


def _read(root: Path, rel: str) -> bytes | None:
    """The file's bytes, None when absent.  Opened non-blocking and refused unless a regular
    file: a FIFO in a captured tree would block the read forever."""
    path = root / rel.lstrip("/")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:
        raise host_file_error(root, rel, "permission denied (run as root, or make it readable)") from None
    except OSError as e:  # a symlink loop, ...
        raise host_file_error(root, rel, f"cannot open it ({e.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise host_file_error(root, rel, "is not a regular file")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise host_file_error(root, rel, f"cannot read it ({e.strerror})") from None
    finally:
        os.close(fd)


def read_text(root: Path, rel: str, default: str | None = None) -> str | None:
    data = _read(Path(root), rel)
    if data is None:
        return default
    try:
        return data.decode().strip()
    except UnicodeDecodeError:
        raise host_file_error(root, rel, "is not UTF-8 text") from None


def read_bytes(root: Path, rel: str) -> bytes | None:
    return _read(Path(root), rel)


def read_acpi_table(root: Path, signature: str, parse):
    """The host's ACPI table ``signature`` (/sys/firmware/acpi/tables) parsed, None when absent;
    one line naming the file when it is damaged."""
    rel = f"sys/firmware/acpi/tables/{signature}"
    raw = read_bytes(root, rel)
    if not raw:
        return None
    try:
        return parse(raw)
    except AcpiFormatError as e:
        raise host_file_error(root, rel, str(e)) from None


def parse_int(text: str, base: int = 10) -> int:
    """A number as the kernel writes it (decimal, or hex with or without 0x); ValueError else."""
    t = text.strip()
    if base == 16:
        t = t[2:] if t[:2] in ("0x", "0X") else t
        ok = re.fullmatch(r"[0-9a-fA-F]+", t)
    else:
        ok = _NUMBER.fullmatch(t)
    if not ok:
        raise ValueError(f"{text!r} is not a {'hexadecimal' if base == 16 else 'decimal'} number")
    return int(t, base)


def _cpu_number(text: str, part: str) -> int:
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"'{part[:40]}' is not a CPU number or a range N-M")
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(MAX_CPU)) or int(digits) > MAX_CPU:  # no int() of a 5000-digit string
        raise ValueError(f"CPU {digits[:20]}{'...' if len(digits) > 20 else ''} is above {MAX_CPU} "
                         "(Linux on x86 runs at most 8192 CPUs, NR_CPUS)")
    return int(digits)


def parse_cpu_list(text: str) -> list[int]:
    """Parse the kernel's CPU list format ("0-3,5,7-8"); "" is the empty list.

    ValueError naming the bad part for anything else: an open or reversed range ("0-", "3-1"),
    a part that is not a number, a CPU above MAX_CPU (so a list never grows without bound)."""
    out: list[int] = []
    text = text.strip()
    if not text:
        return out
    for part in text.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        first = _cpu_number(lo, part)
        last = _cpu_number(hi, part) if dash else first
        if first > last:
            raise ValueError(f"range '{part}' runs backwards; write it low-high")
        out.extend(range(first, last + 1))
    return out


def read_cpu_list(root: Path, rel: str, default: str) -> list[int]:
    text = read_text(root, rel, default) or default
    try:
        return parse_cpu_list(text)
    except ValueError as e:
        raise host_file_error(root, rel, f"not a CPU list ({e})") from None


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
