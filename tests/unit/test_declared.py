"""Slice declarations (declared.py): TOML -> the `coreslice boot` arguments, checked by boot's own
parser; and a declaration against what the ledger recorded (drift)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coreslice import cli, declared
from coreslice.cli.boot import recorded_argv
from coreslice.errors import UsageError
from coreslice.ledger import SliceRecord

GIB = 1 << 30
SRC = Path("/etc/coreslice/slices/web.toml")

FULL = """\
kernel = "/boot/vmlinuz-6.12"
initrd = "initrd.img"            # relative: from the file's directory
cmdline = "-quiet loglevel=3"    # starts with '-': still a value
cpus = "1-2"
memory = "1G@0x40000000"
console = "io:0x2f8"
device = ["0000:01:00.0", "0000:02:00.0"]
nic_vf = ["0000:99:00.0:1"]
nvme-vf = ["0000:8d:00.0:0"]
guest-kernel = "slice"
tsc_khz = 2496012
earlyprintk = true
devices-polled = false
on-crash = "restart"
"""


def test_a_full_declaration_is_the_boot_command_line():
    d = declared.declaration(FULL, SRC)
    assert d.name == "web"
    assert d.argv == (
        "--kernel=/boot/vmlinuz-6.12", "--initrd=/etc/coreslice/slices/initrd.img", "--cmdline=-quiet loglevel=3",
        "--cpus=1-2", "--memory=1G@0x40000000", "--console=io:0x2f8", "--device=0000:01:00.0",
        "--device=0000:02:00.0", "--nic-vf=0000:99:00.0:1", "--nvme-vf=0000:8d:00.0:0", "--guest-kernel=slice",
        "--tsc-khz=2496012", "--earlyprintk", "--on-crash=restart")
    assert d.boot_argv()[-2:] == ["--name", "web"]
    a = d.args  # what the real boot parser made of it
    assert a.command == "boot" and a.name == "web" and a.cpus == [1, 2] and a.tsc_khz == 2496012
    assert a.devices == ["0000:01:00.0", "0000:02:00.0"] and a.earlyprintk and not a.devices_polled
    assert a.initrd == Path("/etc/coreslice/slices/initrd.img") and a.cmdline == "-quiet loglevel=3"
    assert a.on_crash == "restart"


def test_an_image_dir_is_taken_from_the_files_directory_a_name_is_not():
    assert declared.declaration('image = "img/web"\nconsole = "none"', SRC).argv[0] == \
        "--image=/etc/coreslice/slices/img/web"
    assert declared.declaration('image = "web"\nconsole = "none"', SRC).argv[0] == "--image=web"


@pytest.mark.parametrize("text, message", [
    ('ncpu = 2\nconsole = "none"', "ncpu: coreslice boot has no option --ncpu; did you mean 'ncpus'?"),
    ('colour = "red"\nconsole = "none"', "colour: coreslice boot has no option --colour; the keys are boot's"),
    ('name = "db"\nconsole = "none"', "name: not a declaration key (the slice's name is the file's name); remove it"),
    ('ledger = "/x"\nconsole = "none"', "ledger: not a declaration key (give the ledger to coreslice apply"),
    ('dry_run = "/x"\nconsole = "none"', "dry_run: not a declaration key (use coreslice apply --dry-run)"),
    ('json = true\nconsole = "none"', "json: not a declaration key"),
    ('nic-vf = ["a"]\nnic_vf = ["b"]\nconsole = "none"', "nic_vf: given twice (also as nic-vf); keep one"),
    ('earlyprintk = "yes"\nconsole = "none"', "earlyprintk is a switch, not a string; write earlyprintk = true"),
    ('cmdline = ["a"]\nconsole = "none"', "cmdline takes one value, not a list; write e.g. cmdline = \"STR\""),
    ("console = {port = 1}", "console takes a string or number, not a table; write e.g. console = "),
    ('device = [1]\nconsole = "none"', "device takes strings, not a number"),
    ('kernel = 5\nconsole = "none"', "kernel is a path, not a number; write e.g. kernel = \"PATH\""),
    ('ncpus = true\nconsole = "none"', "ncpus takes a string or number, not true/false"),
    # The boot parser's own refusals, named by key:
    ('ncpus = "two"\nconsole = "none"', "ncpus: 'two' is not a whole number >= 1; give e.g. 2"),
    ('ncpus = 2.5\nconsole = "none"', "ncpus: '2.5' is not a whole number >= 1"),
    ('cpus = "0-x"\nconsole = "none"', "cpus: not a CPU list"),
    ('on_crash = "reboot"\nconsole = "none"', "on_crash: invalid choice: 'reboot' (choose from 'none', 'restart')"),
    ('numa-node = -1\nconsole = "none"', "numa-node: '-1' is not a NUMA node number; write e.g. 0"),
    ('cpus = "1"\nncpus = 1\nconsole = "none"', "ncpus and cpus exclude each other; keep one"),
    ('kernel = "/k"', 'missing console; add e.g. console = "io:0x2f8" (or "none")'),
    ('memory = "1 gig"\nconsole = "none"', "memory: memory size '1 gig' is not a size; write e.g. 512M"),
    ('memory = "1G@x"\nconsole = "none"', "memory: memory base 'x' is not a size"),
    ("kernel = ", "not valid TOML"),
])
def test_a_bad_declaration_is_one_line_naming_file_key_and_fix(text, message):
    with pytest.raises(declared.DeclarationError) as e:
        declared.declaration(text, SRC)
    msg = str(e.value)
    assert msg.startswith(f"{SRC}: ") and message in msg, msg
    assert "\n" not in msg and "--help'" not in msg


def test_the_file_name_must_be_a_slice_name():
    with pytest.raises(declared.DeclarationError, match=r"web 1.toml: the file name makes the slice name 'web 1'"):
        declared.declaration('console = "none"', Path("/d/web 1.toml"))


def test_load_dir(tmp_path, monkeypatch):
    d = tmp_path / "slices"
    d.mkdir()
    (d / "b.toml").write_text('console = "none"\nkernel = "k"\n')
    (d / "a.toml").write_text('console = "none"\nncpus = 0\n')
    (d / ".hidden.toml").write_text("garbage")
    (d / "notes.txt").write_text("garbage")
    (d / "c.toml").write_bytes(b"\xff\xfe")
    got = declared.load_dir(d)
    assert [(type(x).__name__, x.name) for x in got] == [("Invalid", "a"), ("Declaration", "b"), ("Invalid", "c")]
    assert "a.toml: ncpus: '0' is not a whole number >= 1" in got[0].error
    assert got[1].argv[1] == f"--kernel={d}/k"
    assert "c.toml: cannot read it" in got[2].error
    # A relative directory still gives absolute paths (the boots run elsewhere).
    monkeypatch.chdir(tmp_path)
    assert declared.load_dir(Path("slices"))[1].argv[1] == f"--kernel={d}/k"
    # The default directory may be missing (nothing declared), one named explicitly may not.
    assert declared.load_dir(tmp_path / "none") == []
    with pytest.raises(UsageError, match="not a directory"):
        declared.load_dir(tmp_path / "none", must_exist=True)
    with pytest.raises(UsageError, match="not a directory"):
        declared.load_dir(d / "notes.txt")


def test_slices_dir(monkeypatch):
    monkeypatch.delenv(declared.ENV, raising=False)
    assert declared.slices_dir() == Path("/etc/coreslice/slices")
    monkeypatch.setenv(declared.ENV, "/srv/s")
    assert declared.slices_dir() == Path("/srv/s") and declared.slices_dir("/x") == Path("/x")


# -- drift ----------------------------------------------------------------------------------------

def _recorded(d: declared.Declaration) -> tuple[str, ...]:
    """What boot records of the declaration's arguments (the lead's recorded_argv)."""
    ns = cli.build_parser().parse_args(list(d.boot_argv()))
    return recorded_argv(ns.boot_parser, ns)


def _row(request, cpus=(1, 2), base=0x40000000, size=GIB) -> SliceRecord:
    return SliceRecord(name="web", cpus=cpus, apic_ids=cpus, mem_base=base, mem_size=size, state="running",
                       request=request)


def test_a_slice_booted_from_its_declaration_shows_no_drift():
    d = declared.declaration(FULL, SRC)
    assert declared.compare(d, _row(_recorded(d))) == ([], None)


def test_drift_names_each_field_that_differs():
    d = declared.declaration(FULL, SRC)
    changed = declared.declaration(FULL.replace("loglevel=3", "loglevel=7").replace('"restart"', '"none"')
                                   .replace(', "0000:02:00.0"', "").replace("earlyprintk = true", ""), SRC)
    drift, note = declared.compare(changed, _row(_recorded(d)))
    assert note is None
    assert drift == ["cmdline: declared '-quiet loglevel=7', running '-quiet loglevel=3'",
                     "device: declared [0000:01:00.0], running [0000:01:00.0, 0000:02:00.0]",
                     "earlyprintk: declared False, running True",
                     "on-crash: declared none, running restart"]


def test_placement_drift_from_the_ledger_row():
    d = declared.declaration(FULL, SRC)
    req = _recorded(d)
    assert declared.compare(d, _row(req, cpus=(3, 4)))[0] == ["cpus: declared 1-2, running on 3-4"]
    assert declared.compare(d, _row(req, base=0x80000000))[0] == [
        "memory: declared 1G@0x40000000, running in 1G@0x80000000"]
    placed = declared.declaration('ncpus = 2\nmemory = "512M"\nnuma-node = 1\nconsole = "none"', SRC)
    row = _row(_recorded(placed), cpus=(1, 2), size=GIB)
    assert declared.compare(placed, row, {1: 0, 2: 0})[0] == [
        "memory: declared 512M, running in 1G@0x40000000", "numa-node: declared 1, running on node 0"]
    assert declared.compare(placed, _row(row.request, cpus=(3, 4, 5), size=GIB // 2), {3: 1, 4: 1, 5: 1})[0] == [
        "ncpus: declared 2, running on 3 (3-5)"]
    assert declared.compare(placed, _row(row.request, cpus=(3, 4), size=GIB // 2), {3: 1, 4: 1}) == ([], None)


def test_a_row_without_its_request_cannot_be_compared():
    d = declared.declaration(FULL, SRC)
    assert declared.compare(d, _row(None)) == ([], "cannot compare: recorded without its request")
    # An older SliceRecord without the field at all (before the lead's change) reads the same.
    class Old:
        cpus, mem_base, mem_size = (1, 2), 0x40000000, GIB
    assert declared.compare(d, Old()) == ([], "cannot compare: recorded without its request")
    drift, note = declared.compare(d, _row(("--no-such-option",)))
    assert drift == [] and note.startswith("cannot compare: the recorded request no longer parses")
