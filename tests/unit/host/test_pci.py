"""PCI discovery: kernel-log parsing, the sysfs fallback, functions and their roots, `host show`.

The fixtures under tests/fixtures/hosts are real machines (see each README.md): the emulated
q35 captured as a whole host tree, and four public dmesg logs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from coreslice import cli
from coreslice.acpi.tables import McfgAllocation
from coreslice.host import dmesg, pci
from coreslice.host.snapshot import discover

from ..hosttree import ROOT_PORT, SRIOV_NIC, SRIOV_VF, make_host_tree

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "hosts"


def log_of(name: str) -> list[str]:
    return (FIXTURES / name / "dmesg.txt").read_text().splitlines()


def windows(r: pci.RootComplex) -> tuple:
    """(buses, io, mem below 4G, mem above 4G) of a root, as inclusive (first, last) pairs."""
    return ((r.bus_start, r.bus_end), [(w.start, w.end) for w in r.io],
            [(w.start, w.end) for w in r.mem_below_4g], [(w.start, w.end) for w in r.mem_above_4g])


# --- the kernel log ----------------------------------------------------------------------------

@pytest.mark.parametrize("line", [
    "pci_bus 0000:3a: root bus resource [io  0x6000-0x7fff window]",
    "[    1.668048] pci_bus 0000:3a: root bus resource [io  0x6000-0x7fff window]",
    "kern  :info  : [Fri Apr  7 00:04:39 2023] pci_bus 0000:3a: root bus resource [io  0x6000-0x7fff window]",
    "Apr 18 12:12:38 test01 kernel: pci_bus 0000:3a: root bus resource [io  0x6000-0x7fff window]",
    "<6>[    1.668048] pci_bus 0000:3a: root bus resource [io  0x6000-0x7fff window]",
])
def test_root_bus_line_in_any_dmesg_format(line):
    (r,) = dmesg.parse_log([line]).roots
    assert (r.segment, r.bus, r.resources) == (0, 0x3A, [dmesg.LogResource("io", 0x6000, 0x7FFF, True)])


def test_resource_flags_bus_ranges_and_translation():
    log = dmesg.parse_log([
        "pci_bus 0000:00: root bus resource [mem 0xeec00000-0xeecfffff]",       # consumed (no window)
        "pci_bus 0000:00: root bus resource [mem 0x480000000000-0x483fffffffff pref window]",
        "pci_bus 0000:00: root bus resource [bus 00-7e]",
        "pci_bus 0000:ff: root bus resource [bus ff]",
        "pci_bus 0002:80: root bus resource [io  0x10000-0x1ffff window] (bus address [0x0000-0xffff])",
        "pci_bus 0000:05: on NUMA node 1",                                        # not a root: ignored
    ])
    assert log.marks_windows
    a, b, c = log.roots
    assert a.bus_end == 0x7E and [x.window for x in a.resources] == [False, True]
    assert a.resources[1].prefetchable
    assert (b.bus, b.bus_end, b.resources) == (0xFF, 0xFF, [])
    assert (c.segment, c.bus_end, c.resources[0].offset) == (2, None, 0x10000)
    # No [bus] line: the kernel uses the root bus up to 0xff; a translated window is refused for a DSDT.
    root = pci.roots_from_log(log)[2]
    assert root.bus_end == 0xFF
    with pytest.raises(ValueError, match="translated"):
        root.dsdt_root()


def test_ecam_lines_old_and_new():
    log = dmesg.parse_log([
        "PCI: MMCONFIG for domain 0000 [bus 00-ff] at [mem 0x80000000-0x8fffffff] (base 0x80000000)",
        "PCI: ECAM [mem 0xb0000000-0xbfffffff] (base 0xb0000000) for domain 0001 [bus 00-ff]",
        "acpi PNP0A08:00: [Firmware Info]: MMCONFIG for domain 0000 [bus 00-3f] only partially covers this bridge",
    ])
    assert log.ecam == [McfgAllocation(0x80000000, 0, 0, 0xFF), McfgAllocation(0xB0000000, 1, 0, 0xFF)]


# --- the fixtures: every root with its windows -------------------------------------------------

Z8 = {  # the prototype's HP Z8: 8 roots, segment 0 (sliceloader-x64 README)
    "0000:00": ((0x00, 0x13), [(0x0, 0xCF7), (0x1000, 0x3FFF)],
                [(0xC4000, 0xC7FFF), (0xFE010000, 0xFE010FFF), (0x90000000, 0x9D7FFFFF)],
                [(0x380000000000, 0x383FFFFFFFFF)]),
    "0000:14": ((0x14, 0x1F), [(0x4000, 0x5FFF)], [(0x9D800000, 0xAAFFFFFF)], [(0x384000000000, 0x387FFFFFFFFF)]),
    "0000:20": ((0x20, 0x2B), [(0x6000, 0x7FFF)], [(0xAB000000, 0xB87FFFFF)], [(0x388000000000, 0x38BFFFFFFFFF)]),
    "0000:2c": ((0x2C, 0x7F), [(0x8000, 0x9FFF), (0x3B0, 0x3BB), (0x3C0, 0x3DF)],
                [(0xA0000, 0xBFFFF), (0xB8800000, 0xC5FFFFFF)], [(0x38C000000000, 0x38FFFFFFFFFF)]),
    "0000:80": ((0x80, 0x8B), [], [(0xC6000000, 0xD37FFFFF)], [(0x390000000000, 0x393FFFFFFFFF)]),
    "0000:8c": ((0x8C, 0x97), [(0xA000, 0xBFFF)], [(0xD3800000, 0xE0FFFFFF)], [(0x394000000000, 0x397FFFFFFFFF)]),
    "0000:98": ((0x98, 0xA3), [(0xC000, 0xDFFF)], [(0xE1000000, 0xEE7FFFFF)], [(0x398000000000, 0x39BFFFFFFFFF)]),
    "0000:a4": ((0xA4, 0xFF), [(0xE000, 0xFFFF)], [(0xEE800000, 0xFBFFFFFF)], [(0x39C000000000, 0x39FFFFFFFFFF)]),
}

T630 = {  # Dell PowerEdge T630: two socket roots with windows, two uncore roots with a bus only
    "0000:00": ((0x00, 0x7E), [(0x0, 0x3BB), (0x3BC, 0x3DF), (0x3E0, 0xCF7), (0x1000, 0x7FFF)],
                [(0xA0000, 0xBFFFF), (0x90000000, 0xC7FFBFFF)], [(0x38000000000, 0x3BFFFFFFFFF)]),
    "0000:7f": ((0x7F, 0x7F), [], [], []),
    "0000:80": ((0x80, 0xFE), [(0x8000, 0xFFFF)], [(0xC8000000, 0xFBFFBFFF)], [(0x3C000000000, 0x3FFFFFFFFFF)]),
    "0000:ff": ((0xFF, 0xFF), [], [], []),
}

SUPERMICRO = {  # X11DAi-N: 8 roots, 4 per socket
    "0000:00": ((0x00, 0x16), [(0x0, 0x3AF), (0x3E0, 0xCF7), (0x3B0, 0x3BB), (0x3C0, 0x3DF), (0x1000, 0x3FFF)],
                [(0xA0000, 0xBFFFF), (0xC4000, 0xC7FFF), (0xFE010000, 0xFE010FFF), (0x90000000, 0x9D7FFFFF)],
                [(0x380000000000, 0x383FFFFFFFFF)]),
    "0000:17": ((0x17, 0x39), [(0x4000, 0x5FFF)], [(0x9D800000, 0xAAFFFFFF)], [(0x384000000000, 0x387FFFFFFFFF)]),
    "0000:3a": ((0x3A, 0x5C), [(0x6000, 0x7FFF)], [(0xAB000000, 0xB87FFFFF)], [(0x388000000000, 0x38BFFFFFFFFF)]),
    "0000:5d": ((0x5D, 0x7F), [(0x8000, 0x9FFF)], [(0xB8800000, 0xC5FFFFFF)], [(0x38C000000000, 0x38FFFFFFFFFF)]),
    "0000:80": ((0x80, 0x84), [(0xA000, 0xBFFF)], [(0xC6000000, 0xD37FFFFF)], [(0x390000000000, 0x393FFFFFFFFF)]),
    "0000:85": ((0x85, 0xAD), [(0xC000, 0xDFFF)], [(0xD3800000, 0xE0FFFFFF)], [(0x394000000000, 0x397FFFFFFFFF)]),
    "0000:ae": ((0xAE, 0xD6), [(0xE000, 0xEFFF)], [(0xE1000000, 0xEE7FFFFF)], [(0x398000000000, 0x39BFFFFFFFFF)]),
    "0000:d7": ((0xD7, 0xFF), [(0xF000, 0xFFFF)], [(0xEE800000, 0xFBFFFFFF)], [(0x39C000000000, 0x39FFFFFFFFFF)]),
}

XW9400 = {  # HP xw9400: one root per socket, each in its own segment; no "window" flags (3.8)
    "0000:00": ((0x00, 0x3F), [(0x0, 0x3AF), (0x3B0, 0x3DF), (0x3E0, 0xCF7), (0xD00, 0xFFF), (0x3000, 0x4FFF)],
                [(0xA0000, 0xBFFFF), (0xE0000000, 0xEFFFFFFF), (0xF8000000, 0xFA2FFFFF)], []),
    "0001:40": ((0x40, 0xFF), [(0x1000, 0x2FFF)], [(0xFA300000, 0xFA4FFFFF)], []),
}

Q35 = {  # the emulated machine, captured
    "0000:00": ((0x00, 0xFF), [(0x0, 0xCF7), (0xD00, 0xFFFF)],
                [(0xA0000, 0xBFFFF), (0x80000000, 0xAFFFFFFF), (0xC0000000, 0xFEBFFFFF)],
                [(0xC000000000, 0xC7FFFFFFFF)]),
}


Q35_PXB = {  # the emulated machine with three pxb-pcie root buses, captured
    "0000:00": ((0x00, 0x1F), [(0x0, 0xCF7), (0xD00, 0xBFFF), (0xF000, 0xFFFF)],
                [(0xA0000, 0xBFFFF), (0x80000000, 0xAFFFFFFF), (0xC0000000, 0xFE3FFFFF), (0xFEA00000, 0xFEA02FFF),
                 (0xFEA06000, 0xFEBFFFFF)], [(0xC060000000, 0xC87FFFFFFF)]),
    "0000:20": ((0x20, 0x21), [(0xE000, 0xEFFF)], [(0xFE800000, 0xFE9FFFFF), (0xFEA03000, 0xFEA03FFF)],
                [(0xC040000000, 0xC05FFFFFFF)]),
    "0000:40": ((0x40, 0x41), [(0xD000, 0xDFFF)], [(0xFE600000, 0xFE7FFFFF), (0xFEA04000, 0xFEA04FFF)],
                [(0xC020000000, 0xC03FFFFFFF)]),
    "0000:60": ((0x60, 0x61), [(0xC000, 0xCFFF)], [(0xFE400000, 0xFE5FFFFF), (0xFEA05000, 0xFEA05FFF)],
                [(0xC000000000, 0xC01FFFFFFF)]),
}


@pytest.mark.parametrize("name, expected", [
    ("hp-z8", Z8), ("dell-poweredge-t630", T630), ("supermicro-x11dai-n", SUPERMICRO), ("hp-xw9400", XW9400),
])
def test_fixture_roots_from_dmesg(name, expected):
    topo = pci.from_log(log_of(name))
    assert topo.source == pci.SOURCE_LOG
    assert {r.name: windows(r) for r in topo.roots} == expected


def test_emulated_host_tree():
    host = discover(FIXTURES / "qemu-q35")
    assert {r.name: windows(r) for r in host.pci.roots} == Q35
    assert host.pci.roots[0].acpi_name == "PCI0"
    assert host.mcfg == [McfgAllocation(0xB0000000, 0, 0, 0xFF)] == host.pci.ecam_from_log
    fns = {f.address: f for f in host.pci.functions}
    assert fns["0000:00:10.0"].class_code == 0x070002 and fns["0000:00:10.0"].driver == "serial"
    assert (fns["0000:00:10.0"].vendor, fns["0000:00:10.0"].device) == (0x1B36, 0x0002)
    assert fns["0000:00:01.0"].driver == "virtio-pci" and fns["0000:00:1f.0"].is_bridge
    assert all(f.root == "0000:00" for f in fns.values())


def test_emulated_host_with_pxb_root_buses():
    """Functions map to their root through the sysfs path (pci0000:40/0000:40:00.0/0000:41:00.0)."""
    topo = discover(FIXTURES / "qemu-q35-pxb").pci
    assert {r.name: windows(r) for r in topo.roots} == Q35_PXB
    under = {r.name: [(f.address, f.driver) for f in topo.functions_under(r)] for r in topo.roots}
    assert under["0000:40"] == [("0000:40:00.0", "pcieport"), ("0000:41:00.0", "serial")]
    assert under["0000:20"] == [("0000:20:00.0", "pcieport"), ("0000:21:00.0", None)]  # the slice's console
    assert len(under["0000:00"]) == 10


def test_rotated_log_falls_back_to_proc_and_sys(tmp_path):
    """Same windows from /proc/iomem + /proc/ioports; buses up to the highest one sysfs shows."""
    tree = tmp_path / "q35"
    shutil.copytree(FIXTURES / "qemu-q35", tree, symlinks=True)
    (tree / "dev/kmsg").write_text("")
    topo = discover(tree).pci
    assert topo.source == pci.SOURCE_SYSFS
    (root,) = topo.roots
    assert windows(root)[1:] == Q35["0000:00"][1:] and (root.bus_start, root.bus_end) == (0, 0)
    assert {f.root for f in topo.functions} == {"0000:00"}


def test_fallback_bus_range_follows_bridges(tmp_path):
    tree = make_host_tree(tmp_path / "h")
    (tree / "dev/kmsg").write_text("")  # no root bus lines
    (tree / "proc/ioports").write_text("0000-0cf7 : PCI Bus 0000:00\nd000-dfff : PCI Bus 0000:20\n")
    topo = pci.read_pci(tree, [])
    assert topo.source == pci.SOURCE_SYSFS
    r20 = topo.root("0000:20")
    # The root port's subordinate bus (33 = 0x21) bounds the range; no sysfs dir for pci0000:00.
    assert (r20.bus_start, r20.bus_end, windows(r20)[1]) == (0x20, 0x21, [(0xD000, 0xDFFF)])
    assert topo.root("0000:00").bus_end == 0


def test_functions_and_their_roots_in_a_host_tree(tmp_path):
    topo = discover(make_host_tree(tmp_path / "h")).pci
    by = {f.address: f for f in topo.functions}
    # Through the sysfs path (pci0000:20/...), and by bus number where sysfs has no host bridge dir.
    assert by[SRIOV_NIC].root == by[SRIOV_VF].root == by[ROOT_PORT].root == "0000:20"
    assert by["0000:00:03.0"].root == "0000:00"
    assert (by[SRIOV_NIC].driver, by[SRIOV_NIC].sriov_totalvfs, by[SRIOV_NIC].sriov_numvfs) == ("igb", 7, 1)
    assert by[SRIOV_VF].physfn == SRIOV_NIC and by[SRIOV_VF].driver is None
    assert by[ROOT_PORT].is_bridge and not by[SRIOV_NIC].is_bridge
    assert [f.address for f in topo.functions_under(topo.root("0000:20"))] == [ROOT_PORT, SRIOV_NIC, SRIOV_VF]


def test_functions_from_a_log():
    topo = pci.from_log(log_of("supermicro-x11dai-n"))
    by = {f.address: f for f in topo.functions}
    assert by["0000:18:00.0"].root == "0000:17" and by["0000:18:00.0"].sriov_totalvfs == 64
    assert by["0000:61:00.1"].sriov_totalvfs == 32 and by["0000:b1:00.0"].class_code == 0x030000
    assert by["0000:3d:00.0"].root == "0000:3a" and by["0000:d8:00.0"].root == "0000:d7"
    assert [r.numa_node for r in topo.roots] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert topo.ecam_from_log == [McfgAllocation(0x80000000, 0, 0, 0xFF)]
    xw = pci.from_log(log_of("hp-xw9400"))
    assert xw.ecam_from_log == [McfgAllocation(0xF0000000, 0, 0, 0x3F), McfgAllocation(0xF0000000, 1, 0x40, 0x7F)]
    assert xw.function("0001:6b:00.0").root == "0001:40"
    # A grep of root bus lines names no function: any address is taken, by its bus.
    assert not pci.from_log(log_of("hp-z8")).functions_known


# --- coreslice host show -----------------------------------------------------------------------

def test_host_show_text(capsys):
    assert cli.main(["host", "show", "--root", str(FIXTURES / "qemu-q35")]) == 0
    out = capsys.readouterr().out
    for want in ("CPUs: 4 present, online 0", "  1    1        offline", "root 0000:00 [PCI0]: segment 0000 buses 00-ff",
                 "mem >4G   0xc000000000-0xc7ffffffff", "0000:00:10.0  0x070002  1b36:0002  serial",
                 "segment 0000 buses 00-ff: 0xb0000000-0xbfffffff", "TSC: 2445407 kHz",
                 "host RAM (System RAM in /proc/iomem): 0x1000-0x9fbff"):
        assert want in out, want


def test_host_show_json_is_complete(capsys, tmp_path):
    assert cli.main(["host", "show", "--json", "--root", str(make_host_tree(tmp_path / "h"))]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [c["apic_id"] for c in doc["cpus"]] == [0, 1, 2, 3]
    assert {r["name"] for r in doc["pci"]["roots"]} == {"0000:00", "0000:20"}
    r20 = next(r for r in doc["pci"]["roots"] if r["name"] == "0000:20")
    assert r20["mem_above_4g"][0]["start"] == 0xC800000000 and r20["io"][0]["end"] == 0xDFFF
    nic = next(f for f in doc["pci"]["functions"] if f["address"] == SRIOV_NIC)
    assert nic["sriov_totalvfs"] == 7 and nic["driver"] == "igb"
    assert doc["mcfg"] == [{"segment": 0, "start_bus": 0, "end_bus": 255, "base_address": 0xB0000000,
                            "start": 0xB0000000, "end": 0xBFFFFFFF}]
    assert doc["tsc_khz"] == 2496012 and doc["firmware_map"] and doc["host_ram"]


def test_host_show_from_dmesg_alone(capsys, monkeypatch):
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO((FIXTURES / "hp-xw9400/dmesg.txt").read_text()))
    assert cli.main(["host", "show", "--from-dmesg", "-", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in doc["pci"]["roots"]] == ["0000:00", "0001:40"]
    assert [(a["segment"], a["start_bus"], a["end_bus"]) for a in doc["mcfg"]] == [(0, 0, 0x3F), (1, 0x40, 0x7F)]
    assert doc["tsc_khz"] == 2900111
    assert cli.main(["host", "show", "--from-dmesg", str(FIXTURES / "hp-z8/dmesg.txt")]) == 0
    out = capsys.readouterr().out
    assert "PCI: 8 root complexes" in out and "root 0000:a4: segment 0000 buses a4-ff" in out
    assert "the log lists no functions" in out


def test_host_show_tree_with_another_log(capsys, tmp_path):
    """--root and --from-dmesg: the tree's CPUs and sysfs, that log's roots."""
    tree = make_host_tree(tmp_path / "h")
    assert cli.main(["host", "show", "--json", "--root", str(tree),
                     "--from-dmesg", str(FIXTURES / "dell-poweredge-t630/dmesg.txt")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in doc["pci"]["roots"]] == ["0000:00", "0000:7f", "0000:80", "0000:ff"]
    assert len(doc["cpus"]) == 4


def test_host_show_bad_inputs(capsys, tmp_path):
    assert cli.main(["host", "show", "--from-dmesg", str(tmp_path / "nope.txt")]) == 2
    assert cli.main(["host", "show", "--root", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "pass a file holding `dmesg` output" in err and "no such directory" in err
