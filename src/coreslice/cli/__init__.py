"""The coreslice command line: thin argparse front end over the domain modules."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from coreslice import __version__
from coreslice.cli import boot, demo, dsdt, host, slices, sriov, testbed
from coreslice.errors import CoresliceError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coreslice",
        description="Split one x86 machine into slices: dedicated cores, a physical memory range and "
                    "devices, each running its own Linux kernel directly on the hardware.")
    parser.add_argument("--version", action="version", version=f"coreslice {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    boot.register(sub)
    slices.register(sub)  # plan, list, stop
    hostp = sub.add_parser("host", help="this host: what it has (show), whether it is ready (check), its kernel command line (configure)",
                          description="Inspect and configure the host that launches slices.")
    hsub = hostp.add_subparsers(dest="host_command", required=True, metavar="COMMAND")
    host.register_configure(hsub)  # configure, check
    host.register(hsub)  # show
    dsdt.register(sub)
    sriov.register(sub)
    testbed.register(sub)
    demo.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CoresliceError as e:
        msg = str(e).replace("\n", " ")
        print(f"coreslice: error: {msg}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": msg, "exit_code": e.exit_code}))
        return e.exit_code
    except KeyboardInterrupt:
        print("coreslice: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
