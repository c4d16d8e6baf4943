"""Every bad input is refused before the first write, with one line naming the problem and the fix.

"No write" is proven with the in-memory machine: no memory write, no IPI, no device detached.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from coreslice import cli
from coreslice.launch import session as launch
from coreslice.boot import bzimage, lowmem
from coreslice.errors import UsageError
from coreslice.host.snapshot import discover
from coreslice.machine.fake import FakeMachine
from coreslice.machine.pci import FakePci
from coreslice.machine.physmem import FakeMemory
from coreslice.request import BootSpec

from ..hosttree import BOOT_ID, make_host_tree

GIB = 1 << 30


class Fakes:
    """The in-memory machine (machine/fake.py), with its parts at hand for the assertions."""

    def __init__(self, preset=None):
        self.m = FakeMachine(preset=preset)
        self.mem, self.pci, self.apics = self.m.mem, self.m.pci, self.m.apics

    def machine(self):
        self.m.mem, self.m.pci = self.mem, self.pci  # a test may have swapped a part
        return self.m

    def assert_untouched(self):
        assert self.m.effects() == []


@pytest.fixture
def spec(debian_kernel, initrd):
    return BootSpec(kernel=debian_kernel.vmlinuz, initrd=initrd, cpus=[1, 2], mem_size=GIB // 2,
                    mem_base=0x40000000, console="io:0x2f8", cmdline="quiet")


def refused(spec, host_tree, match, fakes=None, host=None, **spec_changes):
    fakes = fakes or Fakes()
    spec = dataclasses.replace(spec, **spec_changes)
    with pytest.raises(UsageError, match=match) as exc:
        launch.boot(spec, host=host or discover(host_tree), machine=fakes.machine())
    fakes.assert_untouched()
    msg = str(exc.value)
    assert "\n" not in msg and ";" in msg, f"one line with a fix: {msg!r}"
    return msg


def test_good_spec_writes_and_wakes(spec, host_tree):
    """The baseline the refusals below differ from: the same fakes do see writes and IPIs."""
    fakes = Fakes()
    result = launch.boot(spec, host=discover(host_tree), machine=fakes.machine())
    assert fakes.mem.writes and fakes.apics[0].sent
    names = [s.name for s in result.image.segments]
    assert names[-1] == "trampoline" and names[0] == "kernel"
    # INIT to both CPUs (assert + deassert in xAPIC mode), then two SIPIs to the first one only.
    cmds = fakes.apics[0].sent
    assert [a for a, c in cmds if c >> 8 & 7 == 0b101] == [1, 2, 1, 2]
    sipis = [(a, c) for a, c in cmds if c >> 8 & 7 == 0b110]
    assert sipis == [(1, 0x600 | result.plan.sipi_vector)] * 2
    # What was written reads back: kernel bytes at the load address.
    k = result.plan.kernel
    with open(k.path, "rb") as f:
        f.seek(k.kernel_offset)
        assert fakes.mem.read(result.plan.load_addr, 4096) == f.read(4096)


def test_not_root(spec, host_tree, monkeypatch):
    host = discover(host_tree)
    host.root = Path("/")  # pretend it is the live host
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    refused(spec, host_tree, "must run as root", host=host)


def test_kernel_missing(spec, host_tree, tmp_path):
    refused(spec, host_tree, "no such file", kernel=tmp_path / "vmlinuz-nope")


def test_kernel_not_bzimage(spec, host_tree, tmp_path):
    p = tmp_path / "elf"
    p.write_bytes(b"\x7fELF" + bytes(4096))
    refused(spec, host_tree, "not a bzImage", kernel=p)


def test_kernel_truncated(spec, host_tree, tmp_path, debian_kernel):
    p = tmp_path / "short"
    p.write_bytes(debian_kernel.vmlinuz.read_bytes()[:1 << 20])
    refused(spec, host_tree, "truncated", kernel=p)


@pytest.mark.parametrize("field, value, match", [
    ("relocatable_kernel", 0, "not relocatable"),
    ("xloadflags", 0, "no 64-bit entry"),
    ("version", 0x020A, "too old"),
])
def test_kernel_header_refusals(spec, host_tree, tmp_path, debian_kernel, field, value, match):
    raw = bytearray(debian_kernel.vmlinuz.read_bytes())
    bzimage.set_field(raw, field, value)
    p = tmp_path / "k"
    p.write_bytes(bytes(raw))
    refused(spec, host_tree, match, kernel=p)


def test_initrd_missing(spec, host_tree, tmp_path):
    refused(spec, host_tree, "initrd .* no such file", initrd=tmp_path / "nope.img")


def test_initrd_too_large(spec, host_tree, tmp_path):
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(600 << 20)  # sparse: 600 MiB into a 512 MiB slice
    refused(spec, host_tree, "does not fit", initrd=big)


def test_cmdline_too_long(spec, host_tree):
    refused(spec, host_tree, "command line is .* bytes", cmdline="x" * 3000)


@pytest.mark.parametrize("cpus, match", [
    ([0, 1], "CPU 0 is the host's boot CPU"),
    ([1, 1], "CPU 1 is listed twice"),
    ([1, 9], "CPU 9 is not present"),
    ([], "no CPUs"),
])
def test_bad_cpus(spec, host_tree, cpus, match):
    refused(spec, host_tree, match, cpus=cpus)


def test_online_cpu(spec, tmp_path):
    tree = make_host_tree(tmp_path / "h2", online="0-1")
    refused(spec, tree, "CPU 1 is online in the host", cpus=[1, 2])


@pytest.mark.parametrize("size, base, match", [
    (GIB // 2, 0x40000800, "not page aligned"),
    (GIB // 2 + 0x10, 0x40000000, "not page aligned"),
    (GIB, 0x70000000, "not all RAM in the firmware map"),       # runs into the 0x7ffdf000 hole
    (GIB // 2, 0x280000000, "not all RAM in the firmware map"),  # past the end of RAM
    (GIB // 2, 0x30000000, "overlaps the host's System RAM"),
    (32 << 20, 0x40000000, "too small"),
])
def test_bad_memory(spec, host_tree, size, base, match):
    refused(spec, host_tree, match, mem_size=size, mem_base=base)


@pytest.mark.parametrize("console, match", [
    ("io:0x2e0", "no UART at that port"),
    ("io:0x3f8", "host's own console"),
    ("io:zz", "not an I/O port"),
    ("0000:00:02.0", "not a serial controller"),
    ("0000:00:1f.7", "no such PCI function"),
    ("com2", "neither io:PORT nor a PCI address"),
])
def test_bad_console(spec, host_tree, console, match):
    refused(spec, host_tree, match, console=console)


def test_pci_console_accepted(spec, host_tree):
    fakes = Fakes()
    result = launch.boot(dataclasses.replace(spec, console="00:03.0"), host=discover(host_tree),
                         machine=fakes.machine())
    assert result.plan.console.port == 0xC000
    assert fakes.pci.detached == ["0000:00:03.0"]
    assert "console=uart,io,0xc000,115200n8" in result.plan.cmdline


def test_console_none_boots_without_a_uart(spec, host_tree):
    fakes = Fakes()
    result = launch.boot(dataclasses.replace(spec, console="none"), host=discover(host_tree),
                         machine=fakes.machine())
    assert result.plan.console.port is None and result.plan.console.pci_address is None
    assert "console=" not in result.plan.cmdline and "earlyprintk" not in result.plan.cmdline
    assert fakes.pci.detached == []


def test_console_none_refuses_earlyprintk(spec, host_tree):
    refused(spec, host_tree, "--console none", console="none", earlyprintk=True)


def test_tsc_unknown(spec, tmp_path):
    tree = make_host_tree(tmp_path / "h3", tsc=False)
    refused(spec, tree, "TSC frequency", tsc_khz=None)


def test_cpu_held_by_running_slice(spec, host_tree):
    """A slot record from this host boot that names our CPUs but other memory is a conflict."""
    rec = lowmem.SlotRecord(BOOT_ID, (2, 3), 0x100000000, GIB)
    fakes = Fakes({lowmem.record_address(lowmem.SLOT_BASES[0]): rec.encode()})
    refused(spec, host_tree, r"APIC IDs \[2\] belong to the slice", fakes=fakes)


def test_relaunch_reuses_slot_and_stale_records_are_free(spec, host_tree):
    same = lowmem.SlotRecord(BOOT_ID, (1, 2), spec.mem_base, spec.mem_size)
    stale = lowmem.SlotRecord("0" * 36, (1, 2, 3), 0x100000000, GIB)
    s0, s1 = lowmem.SLOT_BASES[:2]
    fakes = Fakes({lowmem.record_address(s0): stale.encode(), lowmem.record_address(s1): same.encode()})
    result = launch.boot(spec, host=discover(host_tree), machine=fakes.machine())
    assert result.plan.slot == s1 and result.plan.reuse_slot


def test_cli_exit_2_one_line_no_write(tmp_path, host_tree, debian_kernel, capsys):
    rc = cli.main(["boot", "--kernel", str(debian_kernel.vmlinuz), "--cpus", "0-1", "--memory",
                   "512M@0x40000000", "--console", "io:0x2f8", "--host-root", str(host_tree),
                   "--dry-run", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "boot CPU" in err
    assert not (tmp_path / "out").exists()


def test_cli_dry_run_writes_plan_and_segments(tmp_path, host_tree, debian_kernel, initrd, capsys):
    import json
    out = tmp_path / "out"
    rc = cli.main(["boot", "--kernel", str(debian_kernel.vmlinuz), "--initrd", str(initrd), "--cpus", "1-2",
                   "--memory", "512M@0x40000000", "--console", "io:0x2f8", "--host-root", str(host_tree),
                   "--dry-run", str(out), "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    files = sorted(p.name for p in out.iterdir())
    assert "plan.json" in files and "dsdt.asl" in files
    for seg in doc["segments"]:
        match = [f for f in files if f.endswith(f"-{seg['name']}@0x{seg['addr']:x}.bin")]
        assert len(match) == 1 and (out / match[0]).stat().st_size == seg["size"]
    assert (out / next(f for f in files if "-initrd@" in f)).read_bytes() == initrd.read_bytes()


def test_command_line_limit_is_cmdline_size_without_the_nul(spec, host_tree):
    """boot.rst: cmdline_size is the longest command line without its terminating NUL, so a
    line of exactly cmdline_size bytes fits and one byte more is refused."""
    host = discover(host_tree)
    ours = len(launch.boot(spec, host=host, machine=Fakes().machine()).plan.cmdline) - len(spec.cmdline)
    limit = launch.boot(spec, host=host, machine=Fakes().machine()).plan.kernel.cmdline_size
    fits = dataclasses.replace(spec, cmdline="x" * (limit - ours))
    assert len(launch.boot(fits, host=host, machine=Fakes().machine()).plan.cmdline) == limit
    refused(spec, host_tree, f"command line is {limit + 1} bytes, the kernel accepts {limit}",
            cmdline="x" * (limit - ours + 1))


def test_loader_data_is_reserved_in_the_slice_e820(spec, host_tree):
    """The zero page, command line and ACPI tables sit at the top of the range in an e820
    entry of their own marked reserved, so that the slice kernel (KASLR included) never
    allocates over them; no RAM entry overlaps them."""
    from coreslice.boot.zeropage import E820Type
    plan = launch.boot(spec, host=discover(host_tree), machine=Fakes().machine()).plan
    top = plan.mem_base + plan.mem_size
    assert plan.data_addr <= plan.zero_page_addr < plan.cmdline_addr < plan.acpi_addr < top
    assert any(e.type == E820Type.RESERVED and e.addr == plan.data_addr and e.addr + e.size == top
               for e in plan.e820)
    assert not any(e.type == E820Type.RAM and e.addr < top and e.addr + e.size > plan.data_addr for e in plan.e820)


def test_kernel_and_loader_data_in_different_gib_fit_the_slot(spec, host_tree, tmp_path):
    """A 2 GiB slice puts the kernel and the loader data 2 GiB apart: with the kernel's end not
    on a 2 MiB boundary (as the Debian 6.12 kernel's init_size is not) and 4 KiB edge pages they
    would need 8 page-table pages, one more than the low-memory slot holds; rounded out to 2 MiB
    inside the slice's own RAM they fit (and map nothing outside it)."""
    from ..bzimage_fixture import write_bzimage
    odd = write_bzimage(tmp_path / "vmlinuz-odd", payload_size=4 << 20, init_size=(56 << 20) + 0x3000)
    plan = launch.boot(dataclasses.replace(spec, kernel=odd, mem_size=2 * GIB, mem_base=0x100000000),
                       host=discover(host_tree), machine=Fakes().machine()).plan
    lo, hi = plan.mem_base, plan.mem_base + plan.mem_size
    assert all(lo <= a < b <= hi for a, b in plan.page_table_ranges[1:])
    assert plan.page_table_ranges[0] == (plan.slot, plan.slot + 0x1000)
