"""Slices declared in files, started at host boot by ``coreslice apply``.

One TOML file per slice, ``/etc/coreslice/slices/NAME.toml`` (the directory: ``--slices-dir``,
else ``$CORESLICE_SLICES_DIR``); the slice's name is the file's name.  The keys are the long
options of ``coreslice boot``, spelled with '-' or '_'::

    # /etc/coreslice/slices/web.toml
    kernel = "/boot/vmlinuz-6.12.0"
    initrd = "/boot/initrd.img-6.12.0"
    cmdline = "quiet"
    cpus = "1-2"                 # or ncpus = 2
    memory = "1G"                # or "1G@0x40000000"
    console = "io:0x2f8"
    device = ["0000:01:00.0"]    # repeatable options take a list
    on-crash = "restart"         # coreslice watch boots it again when it panics or halts

A declaration becomes the `coreslice boot` arguments (:func:`boot_argv`), which the real boot
parser checks (:func:`check`), so a key boot does not have, a wrong type or a bad value is one
line naming the file, the key and the fix.  Relative paths (kernel, initrd, config, an image
DIR) are taken from the declaration's directory.  Everything here is pure except :func:`load`
and :func:`load_dir`, which read files.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from coreslice.errors import UsageError
from coreslice.request import check_name

ENV = "CORESLICE_SLICES_DIR"
DEFAULT_DIR = Path("/etc/coreslice/slices")
SUFFIX = ".toml"

# Boot options a declaration may not set, and why: they say how one run prints or where it
# reads, or are given by apply itself.
NOT_DECLARABLE = {
    "name": "the slice's name is the file's name",
    "ledger": "give the ledger to coreslice apply (--ledger, or $CORESLICE_LEDGER)",
    "json": "coreslice apply reads boot's JSON itself",
    "dry-run": "use coreslice apply --dry-run",
    "host-root": "coreslice apply --host-root (tests only) gives it",
    "help": "it is no boot setting",
}
# The resources a slice got are in its ledger row, not in its recorded request.
PLACEMENT = ("cpus", "ncpus", "memory", "numa_node")


class DeclarationError(UsageError):
    """A declaration file that cannot be turned into a valid `coreslice boot`."""


@dataclass(frozen=True)
class Declaration:
    name: str
    source: Path
    argv: tuple[str, ...]                     # the `coreslice boot` arguments, without --name
    args: argparse.Namespace = field(compare=False, repr=False)  # argv as the boot parser parsed it

    def boot_argv(self) -> list[str]:
        return ["boot", *self.argv, "--name", self.name]


@dataclass(frozen=True)
class Invalid:
    """A file in the slices directory that is no valid declaration."""

    name: str
    source: Path
    error: str


def slices_dir(arg: Path | str | None = None) -> Path:
    """--slices-dir, else $CORESLICE_SLICES_DIR, else /etc/coreslice/slices."""
    if arg:
        return Path(arg)
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    return DEFAULT_DIR


# -- the boot parser, asked -------------------------------------------------------------------------

def boot_parser() -> argparse.ArgumentParser:
    """The `coreslice boot` subparser of the real command line."""
    from coreslice.cli import build_parser  # here: cli imports most of coreslice

    for a in build_parser()._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a.choices["boot"]
    raise AssertionError("the coreslice parser has no boot command")


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Key (long option without '--') -> its action, for every long option of boot."""
    out = {}
    for a in parser._actions:
        for s in a.option_strings:
            if s.startswith("--"):
                out[s[2:]] = a
    return out


def _is_switch(a: argparse.Action) -> bool:
    return a.nargs == 0


def _is_list(a: argparse.Action) -> bool:
    return isinstance(a, argparse._AppendAction)


def _example(key: str, a: argparse.Action) -> str:
    if _is_switch(a):
        return f"{key} = true"
    if a.choices:
        return f"{key} = {str(next(iter(a.choices)))!r}".replace("'", '"')
    if _is_list(a):
        return f'{key} = ["{a.metavar or "VALUE"}"]'
    return f'{key} = "{a.metavar or "VALUE"}"'


def _type_name(v) -> str:
    return {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(v), type(v).__name__)


# -- declaration -> argv ------------------------------------------------------------------------------

def boot_argv(table: dict, source: Path | str, parser: argparse.ArgumentParser | None = None) -> list[str]:
    """The `coreslice boot` arguments a parsed TOML declaration stands for (each as
    ``--option=value``, so that a value starting with '-' stays a value).  Refuses keys boot does
    not have (or that apply gives itself), a key given twice (``nic-vf`` and ``nic_vf``), and
    values of the wrong kind.  Values are checked by the boot parser later (:func:`check`)."""
    parser = parser or boot_parser()
    options = _options(parser)
    base = Path(source).parent
    argv: list[str] = []
    seen: dict[str, str] = {}
    for raw_key, value in table.items():
        key = raw_key.replace("_", "-")
        where = f"{source}: {raw_key}"
        if key in NOT_DECLARABLE:
            raise DeclarationError(f"{where}: not a declaration key ({NOT_DECLARABLE[key]}); remove it")
        a = options.get(key)
        if a is None:
            close = difflib.get_close_matches(key, [k for k in options if k not in NOT_DECLARABLE], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise DeclarationError(f"{where}: coreslice boot has no option --{key}; {hint}the keys are boot's "
                                   "long options (see coreslice boot --help)")
        if key in seen:
            raise DeclarationError(f"{where}: given twice (also as {seen[key]}); keep one")
        seen[key] = raw_key
        if _is_switch(a):
            if not isinstance(value, bool):
                raise DeclarationError(f"{where} is a switch, not {_type_name(value)}; write {key} = true")
            if value:
                argv.append(f"--{key}")
            continue
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not _is_list(a):
            raise DeclarationError(f"{where} takes one value, not a list; write e.g. {_example(key, a)}")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (str,) if _is_list(a) else (str, int, float)):
                raise DeclarationError(f"{where} takes {'strings' if _is_list(a) else 'a string or number'}, "
                                       f"not {_type_name(v)}; write e.g. {_example(key, a)}")
            if a.type is Path and not isinstance(v, str):
                raise DeclarationError(f"{where} is a path, not {_type_name(v)}; write e.g. {_example(key, a)}")
            text = str(v)
            if a.type is Path or (key == "image" and "/" in text):
                text = str(base / text) if text and not os.path.isabs(text) else text
            argv.append(f"--{key}={text}")
    return argv


_ARG_ERROR = re.compile(r"^argument (--[\w-]+)(?:/[^:]*)?: (.*?)(?:; see '[^']*')?$", re.S)
_REQUIRED = re.compile(r"^the following arguments are required: (.*?)(?:; see '[^']*')?$", re.S)
_NOT_WITH = re.compile(r"^not allowed with argument (--[\w-]+)")


def _key_of(option: str, table_keys: dict[str, str]) -> str:
    key = option.removeprefix("--")
    return table_keys.get(key, key)


def check(argv: list[str] | tuple[str, ...], name: str, source: Path | str, table: dict | None = None,
          ) -> argparse.Namespace:
    """``argv`` parsed by the real `coreslice boot` parser, with ``--name NAME``; its refusals
    become one line naming the file and the key (as spelled in ``table``)."""
    from coreslice.cli import ArgumentError, build_parser

    keys = {k.replace("_", "-"): k for k in (table or {})}
    try:
        check_name(name)
    except UsageError:
        raise DeclarationError(f"{source}: the file name makes the slice name {name!r}, which is not one; "
                               "rename the file to 1-63 letters, digits, '-', '_' or '.', starting with a letter "
                               f"or digit, plus {SUFFIX}") from None
    try:
        ns = build_parser().parse_args(["boot", *argv, "--name", name])
    except ArgumentError as e:
        msg = str(e)
        m = _ARG_ERROR.match(msg)
        if m:
            option, problem = m.groups()
            other = _NOT_WITH.match(problem)
            if other:
                raise DeclarationError(f"{source}: {_key_of(option, keys)} and {_key_of(other.group(1), keys)} "
                                       "exclude each other; keep one") from None
            raise DeclarationError(f"{source}: {_key_of(option, keys)}: {problem}") from None
        m = _REQUIRED.match(msg)
        if m:
            missing = [_key_of(o.strip(), keys) for o in m.group(1).split(",")]
            example = 'console = "io:0x2f8" (or "none")' if missing == ["console"] else f"{missing[0]} = ..."
            raise DeclarationError(f"{source}: missing {', '.join(missing)}; add e.g. {example}") from None
        raise DeclarationError(f"{source}: {msg}") from None
    if ns.memory is not None:  # boot parses SIZE[@BASE] later, in the request: check it here too
        from coreslice.units import parse_memory

        try:
            parse_memory(ns.memory)
        except UsageError as e:
            raise DeclarationError(f"{source}: {keys.get('memory', 'memory')}: {e}") from None
    return ns


def parse(text: str, source: Path | str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DeclarationError(f"{source}: not valid TOML ({e}); fix the file (see coreslice apply --help)") from None


def declaration(text: str, source: Path | str) -> Declaration:
    """A declaration file's text (``source`` names it, and gives the slice's name)."""
    source = Path(source)
    table = parse(text, source)
    argv = boot_argv(table, source)
    name = source.name.removesuffix(SUFFIX)
    return Declaration(name=name, source=source, argv=tuple(argv), args=check(argv, name, source, table))


# -- files --------------------------------------------------------------------------------------------

def load(path: Path) -> Declaration:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DeclarationError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e}); "
                               "make it a readable UTF-8 TOML file") from None
    return declaration(text, path.absolute())  # its relative paths: from its directory, wherever we run


def load_dir(directory: Path, *, must_exist: bool = False) -> list[Declaration | Invalid]:
    """Every ``*.toml`` of ``directory`` (hidden files skipped), by name.  A missing directory
    declares nothing (unless ``must_exist``: one named explicitly)."""
    if not directory.is_dir():
        if must_exist or directory.exists():
            raise UsageError(f"--slices-dir {directory}: not a directory; create it, or name the directory "
                             f"that holds the NAME{SUFFIX} files")
        return []
    out: list[Declaration | Invalid] = []
    for path in sorted(directory.absolute().iterdir()):
        if path.name.startswith(".") or not path.name.endswith(SUFFIX):
            continue
        try:
            out.append(load(path))
        except DeclarationError as e:
            out.append(Invalid(path.name.removesuffix(SUFFIX), path, str(e)))
    return out


# -- a declaration against what the ledger recorded -----------------------------------------------------

def _shown(v) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]" if v else "none"
    if v is None or v == "":
        return "none" if v is None else "''"
    return str(v) if not isinstance(v, str) else repr(v) if " " in v or not v else v


class Uncomparable(Exception):
    """A recorded request that cannot be set against a declaration (the message says why)."""


def compare(decl: Declaration, rec, cpu_nodes: dict[int, int | None] | None = None) -> tuple[list[str], str | None]:
    """(what differs, why the request could not be compared or None) between a declaration and
    the ledger row of the slice of its name.  Rows of an older coreslice have no request."""
    drift = placement_drift(decl.args, tuple(rec.cpus), rec.mem_base, rec.mem_size, cpu_nodes)
    request = getattr(rec, "request", None)
    if request is None:
        return drift, "cannot compare: recorded without its request"
    try:
        return request_drift(decl.args, request) + drift, None
    except Uncomparable as e:
        return drift, str(e)


def request_drift(decl: argparse.Namespace, recorded: list[str] | tuple[str, ...],
                  parser: argparse.ArgumentParser | None = None) -> list[str]:
    """What the declared boot arguments set differently from a recorded request (both parsed
    by the boot parser, so defaults and spellings agree); placement is compared elsewhere."""
    from coreslice.cli import ArgumentError, build_parser

    parser = parser or boot_parser()
    try:
        rec = build_parser().parse_args(["boot", *recorded])
    except ArgumentError as e:
        raise Uncomparable(f"cannot compare: the recorded request no longer parses ({e})") from None
    skip = set(PLACEMENT) | {k.replace("-", "_") for k in NOT_DECLARABLE}
    out = []
    for a in parser._actions:
        if not a.option_strings or a.dest in skip:
            continue
        want, have = getattr(decl, a.dest, None), getattr(rec, a.dest, None)
        if a.dest == "tsc_khz" and want is None:
            continue  # boot records the frequency it read from the host: not a declared choice
        if want != have:
            key = max(a.option_strings, key=len).removeprefix("--")
            out.append(f"{key}: declared {_shown(want)}, running {_shown(have)}")
    return out


def placement_drift(decl: argparse.Namespace, cpus: tuple[int, ...], mem_base: int, mem_size: int,
                    cpu_nodes: dict[int, int | None] | None = None) -> list[str]:
    """What the declared CPUs, memory and NUMA node ask that the slice's resources are not."""
    from coreslice.host.sysfs import format_cpu_list
    from coreslice.units import format_size, parse_memory

    out = []
    have = format_cpu_list(sorted(cpus))
    if decl.cpus is not None and sorted(decl.cpus) != sorted(cpus):
        out.append(f"cpus: declared {format_cpu_list(sorted(decl.cpus))}, running on {have}")
    if decl.ncpus is not None and decl.ncpus != len(cpus):
        out.append(f"ncpus: declared {decl.ncpus}, running on {len(cpus)} ({have})")
    if decl.memory is not None:
        try:
            size, base = parse_memory(decl.memory)
        except UsageError:
            size, base = None, None
        if (size is not None and size != mem_size) or (base is not None and base != mem_base):
            out.append(f"memory: declared {decl.memory}, running in {format_size(mem_size)}@0x{mem_base:x}")
    if decl.numa_node is not None and cpu_nodes is not None:
        nodes = sorted({cpu_nodes.get(c) for c in cpus}, key=lambda n: -1 if n is None else n)
        if nodes != [decl.numa_node]:
            out.append(f"numa-node: declared {decl.numa_node}, running on node "
                       f"{','.join('?' if n is None else str(n) for n in nodes)}")
    return out
