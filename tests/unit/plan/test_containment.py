"""A slice's reboot, poweroff and panic must stay in the slice (README "When a slice crashes,
halts or reboots"): the plan gives every slice its EFI runtime and the parameters that route a
stock kernel's reboot to it, and refuses user parameters that would route it elsewhere."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from coreslice.boot import efi
from coreslice.boot.zeropage import E820Type
from coreslice.host.snapshot import discover
from coreslice.launch import session as launch
from coreslice.plan.boot import slice_cmdline

from .test_boot import Fakes, refused, spec  # noqa: F401  (spec: the fixture)


def _boot(spec, host_tree):
    fakes = Fakes()
    result = launch.boot(spec, host=discover(host_tree), machine=fakes.machine())
    return result, fakes


def test_cmdline_routes_reboot_to_efi_and_panic_to_a_spin():
    words = slice_cmdline(0x2F8, 2_000_000, "quiet", False).split()
    assert "reboot=efi" in words and "panic=0" in words
    # Ours come first; the user's after them (and a later reboot= would win: see the refusals).
    assert words.index("reboot=efi") < words.index("quiet")


def test_efi_runtime_is_written_in_reserved_slice_memory_and_named_by_the_zero_page(spec, host_tree):
    result, fakes = _boot(spec, host_tree)
    plan = result.plan
    top = plan.mem_base + plan.mem_size
    # In the loader's reserved range, after the ACPI tables, page aligned.
    assert plan.acpi_addr < plan.efi_addr and plan.efi_addr % 0x1000 == 0
    assert plan.efi_addr + efi.AREA_SIZE <= top
    assert any(e.type == E820Type.RESERVED and e.addr <= plan.efi_addr and plan.efi_addr + efi.AREA_SIZE <= e.addr + e.size
               for e in plan.e820)
    seg = {s.name: s for s in result.image.segments}["efi"]
    assert (seg.addr, seg.size) == (plan.efi_addr, efi.AREA_SIZE)
    assert not any(s.addr < seg.addr + seg.size and seg.addr < s.addr + s.size
                   for s in result.image.segments if s.name != "efi")
    # What the kernel reads: boot_params.efi_info (0x1c0) -> "EL64", the system table, the map.
    zp = fakes.mem.read(plan.zero_page_addr, 0x1000)
    sig, systab_lo, _, _, mm_lo, mm_size, systab_hi, mm_hi = struct.unpack_from("<4sIIIIIII", zp, 0x1C0)
    assert sig == b"EL64" and zp[0x1EC] == 2  # secure_boot: disabled
    systab = systab_lo | systab_hi << 32
    assert plan.efi_addr <= systab < plan.efi_addr + 0x1000
    assert struct.unpack("<Q", fakes.mem.read(systab, 8))[0] == efi.SYSTEM_TABLE_SIGNATURE
    desc = fakes.mem.read(mm_lo | mm_hi << 32, mm_size)
    entries = [struct.unpack_from("<IIQQQQ", desc, i) for i in range(0, mm_size, efi.MEMORY_DESCRIPTOR_SIZE)]
    assert [(t, a) for t, _, a, _, _, _ in entries if t == efi.EFI_RUNTIME_SERVICES_CODE] == \
        [(efi.EFI_RUNTIME_SERVICES_CODE, plan.efi_addr)]
    # The e820 RAM again, as conventional memory: where the decompressor may put the kernel
    # (physical KASLR), sorted, and nothing else (the loader's data stays out of it).
    conv = [(a, n * 0x1000) for t, _, a, _, n, _ in entries if t == efi.EFI_CONVENTIONAL_MEMORY]
    assert conv == [(e.addr, e.size) for e in plan.e820 if e.type == E820Type.RAM]
    assert [a for _, _, a, _, _, _ in entries] == sorted(a for _, _, a, _, _, _ in entries)
    # The config table points at the slice's own RSDP, the one the zero page names.
    rsdp = struct.unpack_from("<Q", zp, 0x70)[0]
    assert fakes.mem.read(rsdp, 8) == b"RSD PTR "
    assert struct.pack("<Q", rsdp) in fakes.mem.read(plan.efi_addr, 0x1000)
    # The host-readable status record, as plan JSON names it.
    layout = plan.to_json()["layout"]
    assert layout["efi"] == plan.efi_addr and layout["efi_status"] == plan.efi_addr + efi.STATUS_OFFSET
    status = efi.read_status(fakes.mem.read(layout["efi_status"], efi.STATUS_SIZE))
    assert status == efi.EfiStatus(svam_calls=0, reset_calls=0, reset_type=None, reset_status=0)


@pytest.mark.parametrize("param", ["reboot=k", "reboot=bios", "reboot=acpi", "reboot=t", "reboot=pci",
                                   "reboot=w,kbd", "reboot=panic_b"])
def test_reboot_methods_that_reset_the_machine_refused(spec, host_tree, param):
    msg = refused(spec, host_tree, "resets the whole machine", cmdline=f"quiet {param}")
    assert param in msg


@pytest.mark.parametrize("param", ["noefi", "efi=noruntime", "efi=debug,noruntime"])
def test_dropping_the_efi_runtime_refused(spec, host_tree, param):
    refused(spec, host_tree, "turns off the slice's EFI runtime", cmdline=param)


@pytest.mark.parametrize("param", ["reboot=warm", "reboot=cold", "reboot=efi", "reboot=e,w", "efi=debug",
                                   "panic=10", "panic=-1"])
def test_harmless_variants_accepted(spec, host_tree, param):
    result, _ = _boot(dataclasses.replace(spec, cmdline=param), host_tree)
    assert result.plan.cmdline.endswith(param)
