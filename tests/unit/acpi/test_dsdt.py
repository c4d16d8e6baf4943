"""`coreslice dsdt` on real machines: the generated DSDT exposes exactly the roots holding the
given functions, `iasl -d` accepts it, iasl compiles its ASL to the same AML, and acpiexec
evaluates every root's _HID/_CID/_SEG/_BBN/_UID and decodes its _CRS into the expected windows."""

from __future__ import annotations

import contextlib
import io
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from coreslice import cli
from coreslice.acpi import acpica
from coreslice.acpi.tables import checksum

from ..acpi.test_aml import assert_iasl_agrees
from ..host.test_pci import FIXTURES, Q35, Q35_PXB, SUPERMICRO, T630, XW9400, Z8

_BLOCK = re.compile(r"\[\d+\] (?:16|32|64)-Bit \w+ Address Space Resource\n(.*?)\n\n", re.S)
_KIND = {"Bus Number Range": "bus", "I/O Range": "io", "Memory Range": "mem"}
_IDS = ("_HID", "_CID", "_SEG", "_BBN", "_UID")

CASES = [
    # fixture, source option, devices, roots expected in the DSDT (in order), their windows
    ("hp-z8", "--from-dmesg", "0000:21:00.0,0000:8d:00.0,0000:99:00.0", ["0000:20", "0000:8c", "0000:98"], Z8),
    ("hp-z8", "--from-dmesg", "0000:00:1f.0,0000:2d:00.0,0000:2d:00.1", ["0000:00", "0000:2c"], Z8),
    ("dell-poweredge-t630", "--from-dmesg", "0000:03:00.0,0000:7f:08.0,0000:81:00.0",
     ["0000:00", "0000:7f", "0000:80"], T630),
    ("supermicro-x11dai-n", "--from-dmesg", "0000:18:00.0,0000:3d:00.0,0000:b1:00.0,0000:d8:00.0",
     ["0000:17", "0000:3a", "0000:ae", "0000:d7"], SUPERMICRO),
    ("hp-xw9400", "--from-dmesg", "0000:18:00.0,0001:6b:00.0", ["0000:00", "0001:40"], XW9400),
    ("qemu-q35", "--root", "00:10.0", ["0000:00"], Q35),
    ("qemu-q35-pxb", "--root", "0000:41:00.0,0000:61:00.0", ["0000:40", "0000:60"], Q35_PXB),
]
IDS = [f"{c[0]}:{c[2]}" for c in CASES]


@dataclass
class Generated:
    aml: bytes
    asl: str
    stderr: str
    acpiexec: str  # one run: every root's _HID.._UID, then every root's _CRS decoded


def _generate(tmp: Path, fixture: str, option: str, devices: str, roots: list[str]) -> Generated:
    source = FIXTURES / fixture / ("dmesg.txt" if option == "--from-dmesg" else "")
    aml, asl, err = tmp / "dsdt.aml", tmp / "dsdt.asl", io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["dsdt", "-o", str(aml), "--asl", str(asl), option, str(source), "--devices", devices,
                       "--cpus", "2"])
    assert rc == 0, err.getvalue()
    return Generated(aml.read_bytes(), asl.read_text(), err.getvalue(), "")


def _acpiexec(g: Generated, roots: list[str]) -> str:
    names = [f"PC{i:02X}" for i in range(len(roots))]
    cmds = [f"evaluate \\_SB.{n}.{obj}" for n in names for obj in _IDS] + [f"resources \\_SB.{n}" for n in names]
    return acpica.acpiexec(g.aml, *cmds)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Generated]:
    """Every case's DSDT through `coreslice dsdt`, then one acpiexec run per DSDT, in parallel
    (each takes up to a second, most of it waiting to exit)."""
    out = {i: _generate(tmp_path_factory.mktemp("dsdt"), *c[:4]) for i, c in zip(IDS, CASES)}
    with ThreadPoolExecutor(len(CASES)) as pool:
        for g, text in zip(out.values(), pool.map(_acpiexec, out.values(), [c[3] for c in CASES])):
            g.acpiexec = text
    return out


def decoded_crs(out: str, device: str) -> list[tuple[str, int, int, int]]:
    """(kind, minimum, maximum, length) of each descriptor of ``device``'s _CRS, per acpiexec."""
    listing = out[out.index(f"Device: \\_SB.{device}\nEvaluating _CRS"):]
    listing = listing[:listing.index("EndTag Resource")]
    rows = []
    for block in _BLOCK.findall(listing):
        field = dict(re.findall(r"^\s*(.+?) : (.+)$", block, re.M))
        assert field["Consumer/Producer"] == "ResourceProducer"
        rows.append((_KIND[field["Resource Type"]], int(field["Address Minimum"], 16),
                     int(field["Address Maximum"], 16), int(field["Address Length"], 16)))
    return rows


def expected_crs(windows: tuple) -> list[tuple[str, int, int, int]]:
    (b0, b1), io_, mem32, mem64 = windows
    rows = [("bus", b0, b1, b1 - b0 + 1)]
    rows += [("io", a, b, b - a + 1) for a, b in io_]
    rows += [("mem", a, b, b - a + 1) for a, b in mem32 + mem64]
    return rows


@pytest.mark.parametrize("fixture, option, devices, roots, table", CASES, ids=IDS)
def test_dsdt_for_real_machines(generated, fixture, option, devices, roots, table):
    g = generated[f"{fixture}:{devices}"]
    assert g.aml[:4] == b"DSDT" and checksum(g.aml) == 0
    assert_iasl_agrees(g.aml, g.asl)
    names = [f"PC{i:02X}" for i in range(len(roots))]
    assert re.findall(r"Device \((\w+)\)", acpica.disassemble(g.aml)) == ["C000", "C001", *names]
    ids = re.findall(r"\[Integer\] = (\w+)", g.acpiexec)
    for uid, (name, root) in enumerate(zip(names, roots)):
        seg, bus = (int(x, 16) for x in root.split(":"))
        assert ids[uid * 5:uid * 5 + 5] == ["00000000080AD041", "00000000030AD041", f"{seg:016X}",
                                            f"{bus:016X}", f"{uid:016X}"], root
        assert decoded_crs(g.acpiexec, name) == expected_crs(table[root]), root
    assert f"2 processors and {len(roots)} PCI root" in g.stderr


def test_z8_matches_the_prototypes_hand_written_dsdt(generated):
    """The three roots the sliceloader-x64 README wrote by hand (PCI0-PCI2), value by value."""
    out = generated[IDS[0]].acpiexec
    readme = {  # WordBusNumber, WordIO, DWordMemory, ExtendedMemory: (min, max, length)
        "PC00": [(0x20, 0x2B, 0xC), (0x6000, 0x7FFF, 0x2000), (0xAB000000, 0xB87FFFFF, 0x0D800000),
                 (0x388000000000, 0x38BFFFFFFFFF, 0x4000000000)],
        "PC01": [(0x8C, 0x97, 0xC), (0xA000, 0xBFFF, 0x2000), (0xD3800000, 0xE0FFFFFF, 0x0D800000),
                 (0x394000000000, 0x397FFFFFFFFF, 0x4000000000)],
        "PC02": [(0x98, 0xA3, 0xC), (0xC000, 0xDFFF, 0x2000), (0xE1000000, 0xEE7FFFFF, 0x0D800000),
                 (0x398000000000, 0x39BFFFFFFFFF, 0x4000000000)],
    }
    for device, rows in readme.items():
        assert [r[1:] for r in decoded_crs(out, device)] == rows


def test_dsdt_to_stdout_without_files(capsys):
    assert cli.main(["dsdt", "--from-dmesg", str(FIXTURES / "hp-xw9400/dmesg.txt"), "--devices", "0001:6b:00.0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("DefinitionBlock") and "Name (_SEG, One)" in out and "Name (_BBN, 0x40)" in out


@pytest.mark.parametrize("args, message", [
    (["--from-dmesg", "supermicro-x11dai-n", "--devices", "0000:3f:00.0"], "0000:3f:00.0: no such PCI function"),
    (["--from-dmesg", "hp-z8", "--devices", "0001:00:00.0"], "0001:00:00.0 is under no known PCI root complex"),
    (["--from-dmesg", "hp-xw9400", "--devices", "0000:18:00.0,zz"], "'zz' is not a PCI address"),
    (["--from-dmesg", "hp-z8", "--devices", ","], "--devices is empty"),
    (["--root", "qemu-q35", "--devices", "0000:00:05.0"], "0000:00:05.0: no such PCI function"),
])
def test_dsdt_refusals_exit_2_with_one_line(tmp_path, capsys, args, message):
    args = [str(FIXTURES / a / "dmesg.txt") if prev == "--from-dmesg" else str(FIXTURES / a) if prev == "--root" else a
            for prev, a in zip([None, *args], args)]
    assert cli.main(["dsdt", "-o", str(tmp_path / "x.aml"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and ";" in err
    assert not (tmp_path / "x.aml").exists()


@pytest.mark.parametrize("flag", ["-o", "--asl"])
@pytest.mark.parametrize("target, message", [
    ("missing/dsdt.aml", "the folder {tmp}/missing does not exist; create it"),
    (".", "{tmp} is a directory; give a file path"),
    ("fifo", "{tmp}/fifo is not a regular file"),  # opening it for writing would wait for a reader
])
def test_dsdt_outputs_that_cannot_be_written_are_refused_first(tmp_path, capsys, flag, target, message):
    import os

    import threading

    os.mkfifo(tmp_path / "fifo")
    other = tmp_path / ("other.asl" if flag == "-o" else "other.aml")
    out = tmp_path / target if target != "." else tmp_path
    # A regression blocks in open() for writing: a reader that comes and goes makes it fail instead.
    timer = threading.Timer(5, lambda: os.close(os.open(tmp_path / "fifo", os.O_RDONLY | os.O_NONBLOCK)))
    timer.start()
    try:
        rc = cli.main(["dsdt", flag, str(out), "--asl" if flag == "-o" else "-o", str(other), "--from-dmesg",
                       str(FIXTURES / "hp-z8/dmesg.txt"), "--devices", "0000:21:00.0"])
    finally:
        timer.cancel()
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"coreslice: error: {flag} {out}") and message.format(tmp=tmp_path) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]  # neither file written


def test_dsdt_from_a_fifo_nobody_writes_does_not_wait(tmp_path, capsys):
    import os
    import threading

    fifo = tmp_path / "log"
    os.mkfifo(fifo)
    unblocked = []

    def unblock():  # a regression blocks in open(): give it a writer so the test fails, not hangs
        unblocked.append(True)
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    timer = threading.Timer(5, unblock)
    timer.start()
    try:
        rc = cli.main(["dsdt", "--from-dmesg", str(fifo), "--devices", "0000:21:00.0"])
    finally:
        timer.cancel()
    assert rc == 2 and not unblocked and "no known PCI root complex (none known)" in capsys.readouterr().err
