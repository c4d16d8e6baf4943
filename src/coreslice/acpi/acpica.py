"""Check tables with acpica-tools: ``iasl -d`` disassembles, ``iasl`` compiles ASL, ``acpiexec``
loads a DSDT and evaluates objects in it.

For tests and for debugging a slice's tables; the builders never call this.  Every tool runs in a
fresh temporary directory, because iasl writes its output next to its input.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from coreslice.errors import CoresliceError


class AcpicaError(CoresliceError):
    """An acpica tool is missing or rejected its input; the message carries its output."""


def _run(tool: str, args: list[str], cwd: Path) -> str:
    if shutil.which(tool) is None:
        raise AcpicaError(f"{tool} not found: install acpica-tools (apt-get install acpica-tools)")
    proc = subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AcpicaError(f"{tool} {' '.join(args)} failed ({proc.returncode}):\n{out}")
    return out


# What acpica prints about a bad table or a failed evaluation (its exit status stays 0).
_COMPLAINTS = ("Error", "Warning", "Incorrect", "Invalid", "failed", "****")
# acpiexec's "resources" command also tries to write _CRS back through _SRS, which a device with
# fixed resources does not have.
_EXPECTED = {"AcpiSetCurrentResources failed: AE_NOT_FOUND"}


def _check(tool: str, text: str) -> str:
    bad = [line for line in text.splitlines()
           if any(word in line for word in _COMPLAINTS) and line.strip() not in _EXPECTED]
    if bad:
        raise AcpicaError(f"{tool} reported:\n" + "\n".join(bad) + f"\n\nfull output:\n{text}")
    return text


def disassemble(table: bytes) -> str:
    """``iasl -d`` of one table (signature taken from its header); returns the .dsl text.

    Raises if iasl complains, e.g. about a checksum.  iasl (at least 20200925) cannot read a
    standalone RSDP: its file loader wants an SdtHeader.
    """
    name = table[:4].decode("ascii", "replace").strip().lower() or "table"
    with tempfile.TemporaryDirectory(prefix="coreslice-acpi-") as tmp:
        path = Path(tmp) / f"{name}.dat"
        path.write_bytes(table)
        log = _run("iasl", ["-d", path.name], Path(tmp))
        dsl = path.with_suffix(".dsl")
        if not dsl.exists():
            raise AcpicaError(f"iasl -d wrote no {dsl.name}:\n{log}")
        _check("iasl -d", log)
        return _check("iasl -d", dsl.read_text())


def compile_asl(asl: str) -> bytes:
    """``iasl`` of an ASL definition block; returns the AML table it wrote.

    Raises on any error, warning or remark, so that our ASL stays clean.
    """
    with tempfile.TemporaryDirectory(prefix="coreslice-acpi-") as tmp:
        (Path(tmp) / "table.asl").write_text(asl)
        log = _run("iasl", ["table.asl"], Path(tmp))
        if "0 Errors, 0 Warnings, 0 Remarks" not in log:
            raise AcpicaError(f"iasl did not compile cleanly:\n{log}")
        return (Path(tmp) / "table.aml").read_bytes()


def acpiexec(aml: bytes, *commands: str) -> str:
    """Load ``aml`` (a DSDT) into acpiexec and run ``commands`` in batch mode; returns the log.

    acpiexec exits 0 even when a command fails, so a failed evaluation or a warning raises here.
    """
    with tempfile.TemporaryDirectory(prefix="coreslice-acpi-") as tmp:
        (Path(tmp) / "dsdt.aml").write_bytes(aml)
        return _check("acpiexec", _run("acpiexec", ["-b", "; ".join(commands), "dsdt.aml"], Path(tmp)))
