"""``coreslice dsdt``: the DSDT a slice gets for a set of PCI functions, written to files.

What the prototype's users wrote by hand from ``dmesg`` (sliceloader-x64 README, "Author guest
ACPI tables"): one PNP0A08 host bridge per root complex that holds a given function, with its
_SEG, _BBN, _UID and a _CRS of bus, I/O, 32-bit and 64-bit memory windows (acpi/dsdt.py), plus
processor objects.  ``coreslice boot`` builds the same DSDT itself; this command is for reading
it, checking it with acpica-tools, or using it elsewhere.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path

from coreslice.cli import host as hostcmd
from coreslice.plan import pci as pciplan
from coreslice.acpi.dsdt import build_dsdt
from coreslice.errors import UsageError

DSDT_HELP = """\
Write the DSDT that exposes exactly the PCI root complexes holding the given functions (PNP0A08,
_CID PNP0A03, _SEG, _BBN, _UID, _CRS with the bus range and the I/O, 32-bit and 64-bit memory
windows the host's kernel reports), plus --cpus processor objects (ACPI0007, _UID 0..N-1).

The roots come from this host (or --root DIR), or from a saved kernel log (--from-dmesg FILE:
`dmesg` output or just its 'root bus resource' lines).  With a host or a log that lists
functions, each address must be one of them; with only root bus lines, an address belongs to
the root whose bus range holds its bus.  Without -o and --asl the ASL goes to stdout.
"""

DSDT_EPILOG = """\
examples:
  coreslice dsdt --devices 0000:21:00.0,0000:99:00.0 -o dsdt.aml --asl dsdt.asl
  sudo dmesg -t | grep 'root bus resource' > roots.txt
  coreslice dsdt --from-dmesg roots.txt --devices 0000:8d:00.0 --cpus 4
"""


def _cpu_count(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        n = 0
    if not 1 <= n <= 0x1000:
        raise argparse.ArgumentTypeError(f"'{text}' is not a CPU count; give 1 to 4096")
    return n


def check_output(path: Path, flag: str) -> None:
    """Refuse an output file that cannot be written, before anything is (so a refusal writes
    neither file).  A FIFO is refused too: opening it for writing waits for a reader."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UsageError(f"{flag} {path}: {e.strerror}; give a file path you can write") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{flag} {path} is a directory; give a file path, e.g. {path}/dsdt{path.suffix or '.aml'}")
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        raise UsageError(f"{flag} {path} is not a regular file; give a file path you can write")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: the folder {parent} does not exist; create it (mkdir -p {parent}) "
                         "or give another path")
    if not os.access(path if st is not None else parent, os.W_OK):
        raise UsageError(f"{flag} {path}: permission denied; give a path you can write")


def _write(path: Path, data: bytes, flag: str) -> None:
    try:
        path.write_bytes(data)
    except OSError as e:
        raise UsageError(f"{flag} {path}: {e.strerror}; give a file path you can write") from None


def cmd_dsdt(args) -> int:
    addresses = [pciplan.normalize(a) for a in args.devices.split(",") if a.strip()]
    if not addresses:
        raise UsageError("--devices is empty; give PCI addresses, e.g. --devices 0000:21:00.0,0000:99:00.0")
    outputs = [(p, flag) for p, flag in ((args.output, "-o"), (args.asl, "--asl")) if p]
    for path, flag in outputs:
        check_output(path, flag)
    if args.output and args.asl and os.path.abspath(args.output) == os.path.abspath(args.asl):
        raise UsageError(f"-o and --asl both name {args.output}; give two files (e.g. dsdt.aml and dsdt.asl)")
    what = hostcmd.load(args.root, args.from_dmesg)
    roots = pciplan.roots_holding(what.pci, addresses)
    dsdt = build_dsdt(list(range(args.cpus)), pciplan.dsdt_roots(roots))
    if args.output:
        _write(args.output, dsdt.aml, "-o")
    if args.asl:
        _write(args.asl, (dsdt.asl + "\n").encode(), "--asl")
    if not args.output and not args.asl:
        sys.stdout.write(dsdt.asl + "\n")
    summary = ", ".join(f"{r.name} (buses {r.bus_start:02x}-{r.bus_end:02x})" for r in roots)
    print(f"coreslice: DSDT with {args.cpus} processor{'s' * (args.cpus != 1)} and "
          f"{len(roots)} PCI root{'s' * (len(roots) != 1)}: {summary}; source: {what.pci.source}", file=sys.stderr)
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("dsdt", help="write the DSDT exposing the PCI roots of given functions",
                              description=DSDT_HELP, epilog=DSDT_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", required=True, metavar="ADDR[,ADDR...]",
                   help="PCI functions the slice gets, e.g. 0000:21:00.0,0000:99:00.0")
    p.add_argument("-o", "--output", type=Path, metavar="FILE.aml", help="write the DSDT (AML, with its table header)")
    p.add_argument("--asl", type=Path, metavar="FILE.asl", help="write the same table as ASL, for people and iasl")
    p.add_argument("--cpus", type=_cpu_count, default=1, metavar="N", help="processor objects to declare (default: 1)")
    hostcmd.add_source_args(p)
    p.set_defaults(func=cmd_dsdt)
    return p
