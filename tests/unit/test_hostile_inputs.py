"""Hostile and boundary inputs at the command line: every refusal keeps the project's contract.

Hypothesis throws random and boundary command lines at ``boot``, ``plan``, ``list``, ``stop``,
``dsdt`` and ``host configure``: numbers at 0, -1, 2**64 and far beyond; strings with newlines,
escapes, non-ASCII and undecodable bytes; options missing, repeated or unknown; paths that are
missing, directories, FIFOs, symlink loops, under a file, unreadable (mode 000, only when not
root: root reads anything); damaged kernels, ledgers, configs and junk in a copied host tree.
Each run must end with exit 0 (the input was fine), or exactly as the contract says:

* exit status 2 and exactly one line on stderr, ``coreslice: error: <problem>; <fix>``;
* with ``--json``, one JSON object on stdout: ``{"ok": false, "error": <that line>, "exit_code": 2}``;
* no traceback, and nothing changed: no effect on the in-memory machine, and every file of the
  example's folder (host tree, ledger, config, dry-run folder, GRUB drop-in, outputs) as it was;
* no hang: a watchdog gives any FIFO a reader and a writer and interrupts the run.

Each example gets its own folder, host tree copy and ledger (CORESLICE_LEDGER), with the fake
machine selected (machine.using, and CORESLICE_FAKE_MACHINE=1 for boot on a captured tree).
Derandomized, so that CI runs the same examples every time.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import stat
import tempfile
import threading
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coreslice import cli, config, machine
from coreslice.launch import session as launch
from coreslice.ledger import Ledger
from coreslice.machine.fake import FakeMachine
from coreslice.request import BootSpec

from .bzimage_fixture import write_bzimage
from .hosttree import BOOT_ID, make_host_tree

Q35 = Path(__file__).resolve().parents[1] / "fixtures/hosts/qemu-q35"
ROOT = os.geteuid() == 0
# Each example copies a host tree and removes its folder: on a tmpfs that costs a third.
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
TIMEOUT = 10.0  # seconds for one command; a normal run takes well under one
SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


class Hang(Exception):
    pass


# -- templates, made once ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def templates():
    base = Path(tempfile.mkdtemp(prefix="hostile-templates-", dir=SCRATCH))
    yield make_templates(base)
    shutil.rmtree(base, ignore_errors=True)


def make_templates(base: Path) -> "Templates":
    """A synthetic host tree (4 CPUs) and the emulated machine's captured one (PCI functions),
    each with an /etc/default/grub; a kernel; a ledger holding a running slice 'web' (CPUs 1-2)
    of the synthetic host.  Examples get hard-linked copies of the trees: whatever changes a
    file there (junk, GRUB damage) replaces it, never writes into it."""
    tree = make_host_tree(base / "host")
    q35 = base / "q35"
    shutil.copytree(Q35, q35, symlinks=True)
    for t in (tree, q35):
        (t / "etc/default").mkdir(parents=True)
        (t / "etc/default/grub").write_text('GRUB_CMDLINE_LINUX_DEFAULT="quiet"\n')
    kernel = write_bzimage(base / "vmlinuz")
    ledger = base / "ledger.sqlite3"
    from coreslice.host.snapshot import discover
    spec = BootSpec(kernel=kernel, initrd=None, cpus=[1, 2], mem_size=256 << 20, mem_base=0x40000000,
                    console="io:0x2f8", name="web")
    launch.boot(spec, host=discover(tree), machine=FakeMachine(), ledger=Ledger(ledger, BOOT_ID))
    return Templates({"tree": tree, "q35": q35, "kernel": kernel, "ledger": ledger.read_bytes()})


class Templates(dict):
    def __repr__(self):  # Hypothesis prints the arguments of a failing example: not the ledger's bytes
        return "templates"


# -- one example's folder ------------------------------------------------------------------------

class Workspace:
    """A fresh folder with the files an example's command line may name (see ``path``)."""

    def __init__(self, templates):
        self.dir = Path(tempfile.mkdtemp(prefix="hostile-", dir=SCRATCH))
        self.t = templates
        self.ledger = self.dir / "state" / "ledger.sqlite3"
        (self.dir / "afile").write_text("a plain file\n")
        (self.dir / "emptydir").mkdir()
        (self.dir / "fulldir").mkdir()
        (self.dir / "fulldir/x").write_text("x")
        os.symlink("loop", self.dir / "loop")  # a link to itself: ELOOP
        self.fifos: list[Path] = []

    def close(self):
        if not ROOT:  # the mode 000 files made here (not the tree's hard links) must go too
            for p in self.dir.rglob("*"):
                with contextlib.suppress(OSError):
                    if not p.is_symlink() and os.lstat(p).st_mode & 0o777 == 0:
                        os.chmod(p, 0o700)
        shutil.rmtree(self.dir, ignore_errors=True)

    def fifo(self, name: str) -> Path:
        p = self.dir / name
        os.mkfifo(p)
        self.fifos.append(p)
        return p

    def path(self, kind: str, name: str, content: bytes = b"") -> str:
        """A path of ``kind``: a regular file holding ``content``, or something hostile."""
        p = self.dir / name
        if kind == "file":
            p.write_bytes(content)
        elif kind == "missing":
            pass
        elif kind == "dir":
            p.mkdir()
        elif kind == "fifo":
            self.fifo(name)
        elif kind == "loop":
            return str(self.dir / "loop")
        elif kind == "under-file":
            return str(self.dir / "afile" / name)
        elif kind == "mode000":
            p.write_bytes(content)
            p.chmod(0)
        else:
            raise AssertionError(kind)
        return str(p)

    def tree(self, kind: str, junk) -> str:
        if kind in ("synthetic", "q35"):
            dest = self.dir / "host"
            shutil.copytree(self.t["tree" if kind == "synthetic" else "q35"], dest, symlinks=True,
                            copy_function=os.link)
            if junk is not None:
                self.junk(dest, *junk)
            return str(dest)
        return self.path(kind, "host")

    def junk(self, tree: Path, rel: str, how: str, content: bytes) -> None:
        p = tree / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        if how == "bytes":
            p.write_bytes(content)
        elif how == "dir":
            p.mkdir()
        elif how == "fifo":
            os.mkfifo(p)
            self.fifos.append(p)
        elif how == "loop":
            os.symlink(p.name, p)
        elif how == "mode000":
            p.write_bytes(content)
            p.chmod(0)

    def set_ledger(self, kind: str) -> None:
        if kind == "none":
            return
        self.ledger.parent.mkdir()
        good = self.t["ledger"]
        if kind == "good":
            self.ledger.write_bytes(good)
        elif kind == "cut":
            self.ledger.write_bytes(good[:len(good) // 2])
        elif kind == "garbage":
            self.ledger.write_bytes(bytes(range(256)) * 8)
        elif kind == "empty":
            self.ledger.write_bytes(b"")
        elif kind == "bad-json":
            import sqlite3
            self.ledger.write_bytes(good)
            con = sqlite3.connect(self.ledger)
            con.execute("UPDATE slices SET cpus = 'one, two', devices = '{'")
            con.commit()
            con.close()
        elif kind == "dir":
            self.ledger.mkdir()
        elif kind == "fifo":
            self.fifo("state/ledger.sqlite3")
        elif kind == "mode000":
            self.ledger.write_bytes(good)
            self.ledger.chmod(0)

    def snapshot(self) -> dict:
        """Every entry under the folder: its type and, for files and links, what they hold."""
        out = {}
        for dirpath, dirnames, filenames in os.walk(self.dir):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st_ = os.lstat(p)
                if stat.S_ISREG(st_.st_mode):
                    what = ("file", p.read_bytes() if st_.st_mode & 0o444 or ROOT else st_.st_size)
                elif stat.S_ISLNK(st_.st_mode):
                    what = ("link", os.readlink(p))
                else:
                    what = (stat.S_IFMT(st_.st_mode),)
                out[str(p.relative_to(self.dir))] = what
        return out


def run(ws: Workspace, argv: list[str]) -> tuple[int | str, str, str, list[str]]:
    """cli.main(argv) on the fake machine, under a watchdog: (status, stdout, stderr, effects).
    The watchdog gives each FIFO a reader and a writer (a read or write blocked in C, e.g. in
    SQLite, is deaf to signals) and interrupts Python code with SIGALRM."""
    out, err = io.StringIO(), io.StringIO()
    hung = []
    main = threading.main_thread().ident

    def watchdog():
        hung.append(True)
        for f in ws.fifos:
            for mode in (os.O_RDONLY, os.O_WRONLY):
                with contextlib.suppress(OSError):
                    os.close(os.open(f, mode | os.O_NONBLOCK))
        signal.pthread_kill(main, signal.SIGALRM)

    def on_alarm(*_):
        raise Hang()

    old = signal.signal(signal.SIGALRM, on_alarm)
    timer = threading.Timer(TIMEOUT, watchdog)
    fake = FakeMachine()
    try:
        timer.start()
        with machine.using(fake), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc: int | str = cli.main(argv)
            except Hang:
                rc = "hang"
            except SystemExit as e:
                rc = f"SystemExit({e.code})"
            except BaseException:
                rc = "traceback:\n" + traceback.format_exc()
    finally:
        timer.cancel()
        signal.signal(signal.SIGALRM, old)
    if hung and rc != "hang":
        rc = f"hang (unblocked by the watchdog, then {rc})"
    return rc, out.getvalue(), err.getvalue(), fake.effects()


def check(ws: Workspace, argv: list[str], valid: bool = False) -> None:
    """Run ``argv`` and assert the contract; ``valid``: nothing hostile in it, so it must succeed."""
    before = ws.snapshot()
    rc, out, err, effects = run(ws, argv)
    shown = " ".join(repr(a) if not a.isprintable() or " " in a or not a else a for a in argv)
    shown = shown.replace(str(ws.dir), "$WS")
    assert rc in (0, 2), f"coreslice {shown}\n-> {rc}\nstderr: {err}"
    assert rc == 0 or not valid, f"coreslice {shown}\n-> a valid command line refused: {err}"
    as_json = "--json" in (argv[:argv.index("--")] if "--" in argv else argv)  # after "--": a name
    if as_json and (rc == 2 or argv[0] != "dsdt"):
        try:
            doc = json.loads(out)
        except ValueError:
            raise AssertionError(f"coreslice {shown}\n-> {rc}, stdout is not JSON: {out!r}") from None
    if rc == 0:
        return
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"coreslice {shown}\n-> not one line on stderr: {err!r}"
    line = lines[0]
    assert line.startswith("coreslice: error: ") and ";" in line, f"coreslice {shown}\n-> {line!r}"
    assert "Traceback" not in err
    if as_json:
        assert doc == {"ok": False, "error": line[len("coreslice: error: "):], "exit_code": 2}, \
            f"coreslice {shown}\n-> JSON {out!r}"
    assert effects == [], f"coreslice {shown}\n-> refused ({line}) but the machine changed: {effects}"
    after = ws.snapshot()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"coreslice {shown}\n-> refused ({line}) but changed {changed}"


# -- strategies ----------------------------------------------------------------------------------
#
# Each command is a set of slots (an option, a file it names, the ledger, the host tree ...), each
# with a valid and a hostile way to fill it.  An example fills every slot validly except at most
# two, so that a hostile value meets the check that should refuse it, deep in the command, and not
# only argparse; an example with no hostile slot must succeed.

# Real argv cannot hold NUL; it can hold undecodable bytes (surrogateescape) and everything else.
WEIRD = ["", " ", "a\nb", "\n", "\x1b[31m", "\r", "\t", "é", "²", "١", "\u2028", "\udcff", "a" * 300,
         "--json", "-", "'", "\"", "$(id)", "%s"]
TEXT = st.sampled_from(WEIRD) | st.text(st.characters(blacklist_characters="\x00",
                                                      blacklist_categories=("Cs",)), max_size=6)
NUMBERS = st.sampled_from(["0", "-1", "1", "2", "3", "0x1", "010", str(2**32), str(2**63), str(2**64 - 1),
                           str(2**64), "9" * 30, "9" * 5000, "1e3", "1.5", "²", "١", "", " 1", "1 "]) | TEXT
SIZES = st.sampled_from(["512M", "0", "0@0", "4K@0x1000", "1T", "1T@0x100000000", "16777216T", "512M@0x",
                         "256M@-1", "256M@0x100000001", "1G@0x40000000", "1G@0x40000000@1", "-1G",
                         "18446744073709551616", "256M@18446744073709551615", "4K@0xfffffffffffff000", "9" * 60,
                         "1.5G", "²G", "256M@0x0", "256M@0x80000000", "6G@0x100000000"]) | TEXT
CPU_LISTS = st.sampled_from(["1", "1-2", "0", "0-3", "3-1", "0-", "-1", "1,,2", "4", "1-65535", "1-65536",
                             "1-4000000000", "1-100000000000000000000", "a", "", "3,3", " 3 ", "²"]) | TEXT
PATH_KINDS = ["missing", "dir", "fifo", "loop", "under-file"] + ([] if ROOT else ["mode000"])
# (file under the tree, how, content): junk discovery must refuse in one line naming the file.
TREE_JUNK = st.tuples(
    st.sampled_from(["sys/devices/system/cpu/present", "sys/devices/system/cpu/online", "proc/cpuinfo",
                     "sys/firmware/memmap/0/start", "sys/firmware/memmap/3/end", "proc/iomem", "proc/ioports",
                     "sys/firmware/acpi/tables/APIC", "sys/firmware/acpi/tables/MCFG",
                     "sys/firmware/acpi/tables/SRAT", "proc/cmdline", "proc/sys/kernel/random/boot_id",
                     "dev/kmsg", "dev/cpu/0/msr", "sys/class/tty/ttyS1/port", "sys/class/tty/ttyS1/type",
                     "proc/mounts", "proc/consoles", "proc/swaps", "sys/devices/system/cpu", "sys/firmware/memmap",
                     "sys/devices/system/cpu/cpu3/firmware_node/uid", "sys/class/tty", "proc/sys/kernel/osrelease",
                     "sys/bus/pci/devices/0000:00:10.0", "sys/bus/pci/devices/0000:00:10.0/class",
                     "sys/bus/pci/devices/0000:00:10.0/resource", "sys/bus/pci/devices/0000:00:10.0/driver",
                     "sys/bus/pci/devices/0000:00:01.0/numa_node", "sys/devices/pci0000:00"]),
    st.sampled_from(["bytes"] * 4 + ["dir", "fifo", "loop"] + ([] if ROOT else ["mode000"])),
    st.sampled_from([b"", b"0-", b"zz\n", b"0-4000000000\n", b"\xff\xfe\x00", b"APIC\xff\xff\xff\xff",
                     b"processor : x\n", b"0-1,\n", b"00001000-zz : System RAM\n", b"1\n" * 3,
                     b"/dev/root / ext4 rw 0 0\n", b"18446744073709551616\n"]) | st.binary(max_size=40))
CONFIGS = [b'[slice]\nncpus = 1\nmemory = "256M"\n', b"[slice]\nncpus = 0\n", b'[slice]\nmemory = "1.5G"\n',
           b"[nope]\n", b"slice = 3\n", b"[slice\n", b"\xff\xfe[slice]\n", b'[sriov]\nnic = ["zz"]\n',
           b"x = " + b"[" * 3000, b'[sriov]\nmac_base = "01:00:00:00:00:00"\n', b"[slice]\nncpus = 99999999999999999999\n",
           b'[slice]\nmemory = "16777216T"\n', b'[sriov]\nnvme_vq_per_vf = 1\n']


def flag(name, values):
    """A slot for ``name VALUE``: absent when valid, ``values`` when hostile."""
    return (lambda draw, ws: []), (lambda draw, ws: [name, draw(values)])


def fixed(*valid, hostile=None):
    """A slot whose valid form is ``valid``; hostile: ``hostile`` (a strategy of argv fragments)."""
    return (lambda draw, ws: list(valid)), (lambda draw, ws: draw(hostile))


def file_slot(name, option, good, optional=False):
    """An option naming a file: a good copy, or truncated, garbage, empty, or a hostile path."""
    def valid(draw, ws):
        if optional and draw(st.booleans()):
            return []
        return [option, ws.path("file", name, good(ws))]

    def hostile(draw, ws):
        data = good(ws)
        kind = draw(st.sampled_from(["truncated", "garbage", "empty", *PATH_KINDS]))
        if kind == "truncated":
            path = ws.path("file", name, data[:draw(st.integers(0, max(len(data) - 1, 0)))])
        elif kind == "garbage":
            path = ws.path("file", name, draw(st.binary(min_size=1, max_size=2048)))
        elif kind == "empty":
            path = ws.path("file", name, b"")
        else:
            path = ws.path(kind, name, data)
        return [option, path]
    return valid, hostile


def root_slot(option, kind="synthetic"):
    def valid(draw, ws):
        return [option, ws.tree(kind, None)]

    def hostile(draw, ws):
        how = draw(st.sampled_from(["junk", "junk", "junk", "missing", "afile", "loop", "under-file", "emptydir"]))
        if how == "junk":
            return [option, ws.tree(kind, draw(TREE_JUNK))]
        return [option, str(ws.dir / how) if how in ("afile", "loop", "emptydir") else ws.path(how, "host")]
    return valid, hostile


def ledger_slot(valid_kinds=("none", "good")):
    def valid(draw, ws):
        ws.set_ledger(draw(st.sampled_from(valid_kinds)))
        return []

    def hostile(draw, ws):
        ws.set_ledger(draw(st.sampled_from(["cut", "garbage", "empty", "bad-json", "dir", "fifo"]
                                           + ([] if ROOT else ["mode000"]))))
        return []
    return valid, hostile


def config_slot():
    def hostile(draw, ws):
        content = draw(st.sampled_from(CONFIGS) | st.binary(max_size=64))
        kind = draw(st.sampled_from(["file", "file", "file", *PATH_KINDS]))
        path = ws.path(kind, "config.toml", content)
        if draw(st.booleans()):
            os.environ[config.ENV] = path
            return []
        return ["--config", path]
    return (lambda draw, ws: []), hostile


def dir_slot(option, name):
    """An output folder (boot --dry-run): new or empty when valid."""
    def valid(draw, ws):
        if draw(st.booleans()):
            return []
        return [option, str(ws.dir / name) if draw(st.booleans()) else str(ws.dir / "emptydir")]

    def hostile(draw, ws):
        kind = draw(st.sampled_from(["fulldir", "afile", "loop", "fifo", "under-file", "/proc/x", "/sys/x"]))
        if kind.startswith("/"):
            return [option, kind]
        return [option, str(ws.dir / kind) if kind in ("fulldir", "afile", "loop") else ws.path(kind, name)]
    return valid, hostile


def out_slot(option, name):
    """An output file (dsdt -o / --asl): absent or new when valid."""
    def valid(draw, ws):
        return [option, str(ws.dir / name)] if draw(st.booleans()) else []

    def hostile(draw, ws):
        kind = draw(st.sampled_from(["emptydir", "fulldir", *PATH_KINDS]))
        return [option, str(ws.dir / kind) if kind in ("emptydir", "fulldir") else
                ws.path(kind, name) if kind != "missing" else str(ws.dir / "nofolder" / name)]
    return valid, hostile


def json_slot():
    return (lambda draw, ws: ["--json"] if draw(st.booleans()) else []), \
           (lambda draw, ws: ["--json"] if draw(st.booleans()) else [])


def damage_options(draw, argv: list[str], known: list[str]) -> list[str]:
    """Option-level damage: drop one, repeat one, add an unknown one or a stray word."""
    how = draw(st.sampled_from(["drop", "repeat", "unknown", "stray", "equals"]))
    opts = [i for i, a in enumerate(argv) if a.startswith("-") and i > 0]
    if how in ("drop", "repeat") and opts:
        i = draw(st.sampled_from(opts))
        has_value = i + 1 < len(argv) and not argv[i + 1].startswith("-")
        part = argv[i:i + 1 + has_value]
        return argv[:i] + argv[i + 1 + has_value:] if how == "drop" else argv + part
    if how == "unknown":
        return argv + [draw(st.sampled_from(["--bogus", "--json=1", "-x", "--cpu", "--"]))]
    if how == "stray":
        return argv + [draw(TEXT)]
    return argv + [f"{draw(st.sampled_from(known))}={draw(TEXT)}"]


def slot_names(spec) -> list:
    """None (every slot valid), then each slot, then "options" (damage to the option list)."""
    return [None, *sorted(spec()[1]), "options"]


@st.composite
def command(draw, ws: Workspace, spec, forced: str | None) -> tuple[list[str], bool]:
    """(argv, whether it is all valid): ``forced`` hostile (None: nothing hostile), perhaps with
    one more slot hostile; every other slot valid."""
    head, slots, known = spec()
    hostile = set()
    if forced is not None:
        hostile = {forced} | draw(st.sets(st.sampled_from(slot_names(spec)[1:]), max_size=1))
    argv = list(head)
    for name in sorted(slots):
        valid, bad = slots[name]
        argv += (bad if name in hostile else valid)(draw, ws)
    if "options" in hostile:
        argv = damage_options(draw, argv, known)
    return argv, not hostile


# -- the commands ---------------------------------------------------------------------------------

def kernel_bytes(ws):
    return ws.t["kernel"].read_bytes()


def boot_spec():
    return (["boot"], {
        "kernel": file_slot("vmlinuz", "--kernel", kernel_bytes),
        "initrd": file_slot("initrd.img", "--initrd", lambda ws: b"\x07" * 4096, optional=True),
        # io:0x3e8: ttyS2, free (the ledger's slice 'web' holds io:0x2f8, the host's console is io:0x3f8)
        "console": fixed("--console", "io:0x3e8", hostile=st.sampled_from([[], ["--console"]]) | st.tuples(
            st.just("--console"), st.sampled_from(["io:0x2f8", "io:0x3f8", "io:0x0", "io:0x10000", "io:zz", "0000:00:10.0",
                                                   "io:2f8", "io:0x2f8\n", "io:0x2F8"]) | TEXT).map(list)),
        "cpus": fixed("--cpus", "3", hostile=st.sampled_from([[]]) | st.tuples(st.just("--cpus"), CPU_LISTS).map(list)
                      | st.tuples(st.just("--ncpus"), NUMBERS).map(list)),
        "memory": fixed("--memory", "256M@0x100000000",
                        hostile=st.sampled_from([[]]) | st.tuples(st.just("--memory"), SIZES).map(list)),
        "name": flag("--name", TEXT | st.sampled_from(["web", "a" * 64, "-x", ".x"])),
        "cmdline": flag("--cmdline", TEXT | st.sampled_from(["a" * 5000, "console=ttyS0\n", "ü"])),
        "tsc": flag("--tsc-khz", NUMBERS),
        "node": flag("--numa-node", NUMBERS),
        "device": flag("--device", TEXT | st.sampled_from(["0000:00:10.0", "00:1f.0", "0000:00:00.0", "zz:zz.z"])),
        "dry_run": dir_slot("--dry-run", "out"),
        "sriov": fixed(hostile=st.tuples(
            st.sampled_from(["--nic-vf", "--nvme-vf", "--mac", "--guest-kernel"]),
            st.sampled_from(["0000:00:10.0:0", "0000:00:10.0:99999999999999999999", "00:10.0:-1", "0000:00:10.0",
                             "slice", "02:c5:00:00:00:01", "01:00:00:00:00:00", "00:00:00:00:00:00"]) | TEXT
        ).map(list) | st.just(["--guest-kernel", "slice", "--nic-vf", "0000:00:10.0:0"])),
        "root": root_slot("--host-root"),
        "ledger": ledger_slot(),
        "config": config_slot(),
        "json": json_slot(),
    }, ["--cpus", "--memory", "--kernel", "--name", "--tsc-khz", "--console"])


def plan_spec():
    return (["plan"], {
        "cpus": fixed("--ncpus", "1", hostile=st.sampled_from([[]]) | st.tuples(st.just("--cpus"), CPU_LISTS).map(list)
                      | st.tuples(st.just("--ncpus"), NUMBERS).map(list)),
        "memory": fixed("--memory", "256M", hostile=st.sampled_from([[]]) | st.tuples(st.just("--memory"), SIZES).map(list)),
        "name": flag("--name", TEXT),
        "node": flag("--numa-node", NUMBERS),
        "device": flag("--device", TEXT),
        "root": root_slot("--host-root"),
        "ledger": ledger_slot(),
        "config": config_slot(),
        "json": json_slot(),
    }, ["--cpus", "--memory", "--ncpus", "--name"])


def list_spec():
    return (["list"], {
        "all": fixed(hostile=st.just(["--all"])),
        "root": root_slot("--host-root"),
        "ledger": ledger_slot(),
        "json": json_slot(),
    }, ["--ledger", "--host-root"])


def stop_spec():
    return (["stop"], {
        "zname": fixed("web", hostile=st.tuples(st.just("--"), st.just("nosuch") | TEXT).map(list)),  # last
        "root": root_slot("--host-root"),
        "ledger": ledger_slot(valid_kinds=("good",)),  # holds 'web'
        "json": json_slot(),
    }, ["--ledger", "--host-root"])


def dsdt_spec():
    log = (Q35 / "dev/kmsg").read_bytes()
    return (["dsdt"], {
        "devices": fixed("--devices", "0000:00:10.0", hostile=st.tuples(st.just("--devices"), st.sampled_from(
            ["00:10.0", "0000:00:02.0,0000:00:10.0", ",", "zz", "0000:00:1f.0", "0001:00:00.0", "0000:00:10.0," * 50,
             "ffff:ff:1f.7"]) | TEXT).map(list) | st.just([])),
        "aml": out_slot("-o", "dsdt.aml"),
        "asl": out_slot("--asl", "dsdt.asl"),
        "cpus": flag("--cpus", NUMBERS),
        "root": root_slot("--root", kind="q35"),
        "dmesg": ((lambda draw, ws: []), file_slot("dmesg.txt", "--from-dmesg", lambda ws: log)[1]),
    }, ["--devices", "--cpus", "-o"])


def configure_spec():
    def grub_damage(draw, ws):
        grub = ws.dir / "host/etc/default"
        damage = draw(st.sampled_from(["no-grub", "grub.d-file", "dropin-dir", "dropin-fifo", "grub.d-loop",
                                       "grub-dir", "grub-fifo", "cfg-fifo", "cfg-binary"]))
        if not grub.is_dir():
            return []
        if damage in ("no-grub", "grub-dir", "grub-fifo"):
            (grub / "grub").unlink()
            if damage == "grub-dir":
                (grub / "grub").mkdir()
            elif damage == "grub-fifo":
                os.mkfifo(grub / "grub")
                ws.fifos.append(grub / "grub")
        elif damage == "grub.d-file":
            (grub / "grub.d").write_text("")
        elif damage == "grub.d-loop":
            os.symlink("grub.d", grub / "grub.d")
        else:
            (grub / "grub.d").mkdir()
            name = "coreslice.cfg" if damage.startswith("dropin") else "50-other.cfg"
            if damage == "dropin-dir":
                (grub / "grub.d" / name).mkdir()
            elif damage == "cfg-binary":
                (grub / "grub.d" / name).write_bytes(b"\xff\xfeGRUB_CMDLINE_LINUX=maxcpus=\xff\n")
            else:
                os.mkfifo(grub / "grub.d" / name)
                ws.fifos.append(grub / "grub.d" / name)
        return []

    return (["host", "configure"], {
        "profile": fixed("--profile", "slice-host", hostile=st.sampled_from([[]]) | st.tuples(
            st.just("--profile"), st.sampled_from(["vm-host", "native-eval", "Slice-host"]) | TEXT).map(list)),
        "cpus": flag("--host-cpus", NUMBERS),
        "mem": flag("--host-mem", st.sampled_from(["512M", "1G", "256M", "6G", "255M", "257M"]) | SIZES),
        "intremap": flag("--intremap", st.sampled_from(["auto", "off", "on"]) | TEXT),
        "dry_run": fixed(hostile=st.just(["--dry-run"])),
        "root": root_slot("--root"),
        "zgrub": ((lambda draw, ws: []), grub_damage),  # after "root", which makes the tree
        "json": json_slot(),
    }, ["--profile", "--host-cpus", "--host-mem", "--root"])


def exercise(templates, data, spec, hostile: str | None) -> None:
    saved = dict(os.environ)
    saved_default = config.DEFAULT_PATH
    ws = Workspace(templates)
    cwd = os.getcwd()
    try:
        os.chdir(ws.dir)  # a relative path in a generated argv (e.g. -o=é) lands in the folder
        os.environ.pop(config.ENV, None)
        os.environ["CORESLICE_LEDGER"] = str(ws.ledger)
        os.environ["CORESLICE_FAKE_MACHINE"] = "1"  # boot on a captured tree acts on the fake
        config.DEFAULT_PATH = ws.dir / "no-default-config.toml"  # never this machine's /etc
        argv, valid = data.draw(command(ws, spec, hostile), label="argv")
        check(ws, argv, valid)
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved)
        config.DEFAULT_PATH = saved_default
        ws.close()


# One test per (command, hostile slot), so that every slot gets its examples: about ten each keeps
# the whole file near 25 s.

@pytest.mark.parametrize("hostile", slot_names(boot_spec), ids=str)
@settings(max_examples=12, **SETTINGS)
@given(data=st.data())
def test_boot(templates, hostile, data):
    exercise(templates, data, boot_spec, hostile)


@pytest.mark.parametrize("hostile", slot_names(plan_spec), ids=str)
@settings(max_examples=10, **SETTINGS)
@given(data=st.data())
def test_plan(templates, hostile, data):
    exercise(templates, data, plan_spec, hostile)


@pytest.mark.parametrize("hostile", slot_names(list_spec), ids=str)
@settings(max_examples=8, **SETTINGS)
@given(data=st.data())
def test_list(templates, hostile, data):
    exercise(templates, data, list_spec, hostile)


@pytest.mark.parametrize("hostile", slot_names(stop_spec), ids=str)
@settings(max_examples=8, **SETTINGS)
@given(data=st.data())
def test_stop(templates, hostile, data):
    exercise(templates, data, stop_spec, hostile)


@pytest.mark.parametrize("hostile", slot_names(dsdt_spec), ids=str)
@settings(max_examples=10, **SETTINGS)
@given(data=st.data())
def test_dsdt(templates, hostile, data):
    exercise(templates, data, dsdt_spec, hostile)


@pytest.mark.parametrize("hostile", slot_names(configure_spec), ids=str)
@settings(max_examples=10, **SETTINGS)
@given(data=st.data())
def test_host_configure(templates, hostile, data):
    exercise(templates, data, configure_spec, hostile)
