"""The coreslice command line: thin argparse front end over the domain modules."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from coreslice import __version__
from coreslice.cli import apply, boot, console, demo, dmahold, dsdt, evalcmd, host, image, native, nvme, slices, sriov, testbed, vm, watch
from coreslice.errors import CoresliceError, UsageError


class ArgumentError(UsageError):
    """A command line argparse refused (unknown option, missing or bad value)."""


class Parser(argparse.ArgumentParser):
    """argparse with the project's error form: instead of printing the usage block and exiting,
    raise one "<problem>; <fix>" line that main() prints like every other refusal (and as JSON
    with --json).  Subparsers are made with type(parent), so every subcommand gets it too."""

    def error(self, message: str):
        raise ArgumentError(f"{message}; see '{self.prog} --help'")

    def parse_known_args(self, args=None, namespace=None):
        # The innermost subcommand parses first: note its prog, for the --help hint of
        # arguments no parser knew (only the top parser reports those).
        ns, extras = super().parse_known_args(args, namespace)
        if not hasattr(ns, "_prog"):
            ns._prog = self.prog
        return ns, extras


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="coreslice",
        description="Split one x86 machine into slices: dedicated cores, a physical memory range and "
                    "devices, each running its own Linux kernel directly on the hardware.")
    parser.add_argument("--version", action="version", version=f"coreslice {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    boot.register(sub)
    slices.register(sub)  # plan, list, stop
    console.register(sub)  # console, status
    apply.register(sub)
    watch.register(sub)
    hostp = sub.add_parser("host", help="this host: what it has (show), whether it is ready (check), its kernel command line (configure)",
                          description="Inspect and configure the host that launches slices.")
    hsub = hostp.add_subparsers(dest="host_command", required=True, metavar="COMMAND")
    host.register_configure(hsub)  # configure, check
    host.register(hsub)  # show
    dsdt.register(sub)
    sriov.register(sub)
    image.register(sub)
    nvme.register(sub)
    testbed.register(sub)
    demo.register(sub)
    vm.register(sub)
    native.register(sub)
    evalcmd.register(sub)
    dmahold.register(sub)  # started by boot, not listed
    return parser


def one_line(text: str) -> str:
    """``text`` on one line: whitespace runs become a space, other characters that are not
    printable (escape, carriage return, U+2028 ...) become escapes, so that a value quoted in
    an error can neither break the line nor drive the terminal."""
    text = " ".join(text.split("\n"))
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def _refuse(e: CoresliceError, json_out: bool) -> int:
    msg = one_line(str(e))
    print(f"coreslice: error: {msg}", file=sys.stderr)
    if json_out:
        print(json.dumps({"ok": False, "error": msg, "exit_code": e.exit_code}))
    return e.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
        if extras:
            raise ArgumentError(f"unrecognized arguments: {' '.join(extras)}; see '{args._prog} --help'")
    except ArgumentError as e:  # no namespace to ask: --json is asked for if it is among the options
        options = argv[:argv.index("--")] if "--" in argv else argv  # after "--": positional words
        return _refuse(e, "--json" in options)
    try:
        return args.func(args)
    except CoresliceError as e:
        return _refuse(e, getattr(args, "json", False))
    except KeyboardInterrupt:
        print("coreslice: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
