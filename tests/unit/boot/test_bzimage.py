"""Setup-header parsing: the declaration against boot.rst, a synthetic bzImage, damaged copies."""

from __future__ import annotations

import ctypes

import pytest

from coreslice import cli
from coreslice.boot import bzimage as bz  # the name bzimage is the fixture's
from coreslice.boot.errors import BootFormatError
from coreslice.boot.structs import SetupHeader
from coreslice.errors import UsageError

from ..bzimage_fixture import INIT_SIZE, PAYLOAD_SIZE, RELEASE, SETUP_SECTS, VERSION_AT, write_bzimage
from ..hosttree import make_host_tree

# Documentation/arch/x86/boot.rst, "The Real-Mode Kernel Header": (field, offset, size).
BOOT_RST_HEADER = [
    ("setup_sects", 0x1F1, 1), ("root_flags", 0x1F2, 2), ("syssize", 0x1F4, 4), ("ram_size", 0x1F8, 2),
    ("vid_mode", 0x1FA, 2), ("root_dev", 0x1FC, 2), ("boot_flag", 0x1FE, 2), ("jump", 0x200, 2),
    ("header", 0x202, 4), ("version", 0x206, 2), ("realmode_swtch", 0x208, 4), ("start_sys_seg", 0x20C, 2),
    ("kernel_version", 0x20E, 2), ("type_of_loader", 0x210, 1), ("loadflags", 0x211, 1),
    ("setup_move_size", 0x212, 2), ("code32_start", 0x214, 4), ("ramdisk_image", 0x218, 4),
    ("ramdisk_size", 0x21C, 4), ("bootsect_kludge", 0x220, 4), ("heap_end_ptr", 0x224, 2),
    ("ext_loader_ver", 0x226, 1), ("ext_loader_type", 0x227, 1), ("cmd_line_ptr", 0x228, 4),
    ("initrd_addr_max", 0x22C, 4), ("kernel_alignment", 0x230, 4), ("relocatable_kernel", 0x234, 1),
    ("min_alignment", 0x235, 1), ("xloadflags", 0x236, 2), ("cmdline_size", 0x238, 4),
    ("hardware_subarch", 0x23C, 4), ("hardware_subarch_data", 0x240, 8), ("payload_offset", 0x248, 4),
    ("payload_length", 0x24C, 4), ("setup_data", 0x250, 8), ("pref_address", 0x258, 8),
    ("init_size", 0x260, 4), ("handover_offset", 0x264, 4), ("kernel_info_offset", 0x268, 4),
]


def test_setup_header_offsets_match_boot_rst():
    declared = [(name, 0x1F1 + getattr(SetupHeader, name).offset, getattr(SetupHeader, name).size)
                for name, _ in SetupHeader._fields_]
    assert declared == BOOT_RST_HEADER
    assert ctypes.sizeof(SetupHeader) == 0x26C - 0x1F1
    assert (bz.HEADER_START, bz.HEADER_END) == (0x1F1, 0x26C)


def test_synthetic_kernel(bzimage):
    k = bz.parse_bzimage(bzimage)
    assert k.protocol == 0x020F and k.protocol_str == "2.15"
    assert k.xloadflags & bz.XLF_KERNEL_64 and k.can_load_above_4g
    assert k.loadflags & bz.LOADED_HIGH
    assert k.kernel_alignment == 2 << 20 and k.cmdline_size == 2047 and k.pref_address == 16 << 20
    assert k.init_size == INIT_SIZE > k.kernel_size == PAYLOAD_SIZE
    assert k.kernel_offset == (SETUP_SECTS + 1) * 512 == (k.setup[0x1F1] + 1) * 512
    assert k.kernel_offset + k.kernel_size == k.file_size == bzimage.stat().st_size
    assert RELEASE in k.version_string
    assert k.header_end == 0x26C
    hdr = k.header_bytes()
    assert hdr[0x202 - 0x1F1:0x206 - 0x1F1] == b"HdrS"
    raw = bzimage.read_bytes()
    assert raw[0x1FE:0x200] == b"\x55\xaa" and raw[0x202:0x206] == b"HdrS"  # boot.rst, as bytes


def test_get_and_set_field_use_file_offsets(bzimage):
    raw = bytearray(bzimage.read_bytes())
    assert bz.get_field(raw, "version") == int.from_bytes(raw[0x206:0x208], "little") == 0x020F
    bz.set_field(raw, "pref_address", 0x1122334455667788)
    assert raw[0x258:0x260] == bytes.fromhex("8877665544332211")
    with pytest.raises(KeyError):
        bz.get_field(raw, "no_such_field")


def test_a_longer_header_is_kept_whole(tmp_path):
    """A newer protocol's header runs past kernel_info_offset; all of it goes to the zero page."""
    k = bz.parse_bzimage(write_bzimage(tmp_path / "k", header_extra=8))
    assert k.header_end == 0x26C + 8
    assert k.header_bytes()[-8:] == b"\xA5" * 8


# --- which kernels read boot_params.acpi_rsdp_addr ---------------------------------------------
# boot.rst protocol history: 2.13 is Linux 3.14, 2.14 "same as 2.13", 2.15 Linux 5.5; Linux reads
# boot_params.acpi_rsdp_addr since 5.0.  For 2.13/2.14 the version string decides.

ACCEPTED = [
    (0x020D, "5.4.0-150-generic (buildd@lcy02-amd64-044) #167-Ubuntu SMP"),
    (0x020E, "5.0.0 (user@host) #1 SMP"),
    (0x020E, "10.1.0"),
    (0x020F, "6.12.0-coreslice-synthetic (unit tests) #1 SMP"),
    (0x020F, "not a version at all"),  # 2.15 is Linux 5.5: the protocol is proof
    (0x0210, ""),                      # a newer protocol, no version string
]

REFUSED = [
    (0x020E, "4.20.0-1-amd64 (debian-kernel@lists.debian.org) #1 SMP", "kernel version 4.20.0-1-amd64"),
    (0x020D, "4.19.0-20-amd64 (debian-kernel@lists.debian.org) #1 SMP", "kernel version 4.19.0-20-amd64"),
    (0x020D, "4.99", "kernel version 4.99,"),
    (0x020D, "", "kernel version unknown (no version string)"),
    (0x020D, "linux-5.4", "kernel version linux-5.4,"),  # not "major.minor...": unknown, refused
    (0x020C, "3.10.0-1160.el7.x86_64 (mockbuild@) #1 SMP", "kernel version 3.10.0-1160.el7.x86_64"),
    (0x020C, "5.4.0", "boot protocol 2.12"),  # no 5.0+ kernel reports 2.12: refused as it is
]


@pytest.mark.parametrize("protocol, version", ACCEPTED)
def test_kernels_that_read_acpi_rsdp_addr_are_accepted(tmp_path, protocol, version):
    k = bz.parse_bzimage(write_bzimage(tmp_path / "k", protocol=protocol, version_string=version))
    assert k.protocol == protocol and k.version_string == version


@pytest.mark.parametrize("protocol, version, found", REFUSED)
def test_kernels_that_scan_for_the_rsdp_are_refused(tmp_path, protocol, version, found):
    with pytest.raises(BootFormatError) as exc:
        bz.parse_bzimage(write_bzimage(tmp_path / "k", protocol=protocol, version_string=version))
    msg = str(exc.value)
    assert msg.startswith("is too old: ") and found in msg, msg
    assert f"boot protocol {protocol >> 8}.{protocol & 0xFF:02d}" in msg
    assert "the minimum is Linux 5.0 (boot_params.acpi_rsdp_addr)" in msg
    assert exc.value.fix == "use Linux 5.0 or newer"


def test_a_protocol_2_13_header_ends_after_handover_offset(tmp_path):
    """A 2.13 header is 4 bytes shorter than 2.15's; the 4 bytes after it are setup code and must
    neither be accepted as kernel_info_offset nor reach the zero page."""
    path = write_bzimage(tmp_path / "k", protocol=0x020D, version_string="5.4.0-1 #1")
    raw = path.read_bytes()
    assert raw[0x201] == 0x268 - 0x202 and raw[0x268:0x26C] == b"\x5A" * 4
    k = bz.parse_bzimage(path)
    assert k.header_end == 0x268
    assert len(k.header_bytes()) == 0x268 - 0x1F1
    assert k.init_size == INIT_SIZE and k.pref_address == 16 << 20  # fields before the end: read


def test_a_2_15_kernel_with_a_2_13_sized_header_is_refused(tmp_path, bzimage):
    raw = bytearray(bzimage.read_bytes())
    bz.set_field(raw, "jump", 0xEB | (0x268 - 0x202) << 8)  # a 2.15 kernel with a 2.13-sized header
    (tmp_path / "short").write_bytes(bytes(raw))
    with pytest.raises(BootFormatError, match=r"length 0x77 is implausible: a protocol 2.15 header is at least 0x7b"):
        bz.parse_bzimage(tmp_path / "short")


def test_the_version_string_comes_from_the_kernel_version_field(tmp_path):
    """boot.rst "kernel_version": the string is at the field's value + 0x200."""
    path = write_bzimage(tmp_path / "k", protocol=0x020E, version_string="4.20.0 #1")
    raw = bytearray(path.read_bytes())
    raw[VERSION_AT + 0x40:VERSION_AT + 0x50] = b"5.10.0 #1".ljust(16, b"\0")  # pointed to below
    bz.set_field(raw, "kernel_version", VERSION_AT + 0x40 - 0x200)
    path.write_bytes(bytes(raw))
    assert bz.parse_bzimage(path).version_string == "5.10.0 #1"


def _damaged(tmp_path, bzimage, mutate):
    raw = bytearray(bzimage.read_bytes())
    raw = mutate(raw)
    p = tmp_path / "vmlinuz"
    p.write_bytes(bytes(raw))
    return p


def _set(name, value):
    def mutate(raw):
        bz.set_field(raw, name, value)
        return raw
    return mutate


DAMAGED = [
    (_set("header", 0x12345678), "not a bzImage"),
    (_set("boot_flag", 0), "not a bzImage"),
    (_set("version", 0x0209), f"too old: kernel version {RELEASE}, boot protocol 2.09"),
    (_set("xloadflags", 0), "no 64-bit entry"),
    (_set("relocatable_kernel", 0), "not relocatable"),
    (_set("jump", 0x10EB), "setup header length 0x21 is implausible"),
    # boot.rst "jump": the offset is signed, so 0x90 jumps back, not to 0x292 (past the zero
    # page's header area).
    (_set("jump", 0x90EB), "setup header length -0x5f is implausible"),
    (_set("jump", 0x6A90), "no short jump"),
    (_set("syssize", (PAYLOAD_SIZE >> 4) + 1), "truncated: header says"),
    (lambda raw: raw[:len(raw) // 2], "truncated"),
    (lambda raw: raw[:0x300], "truncated"),
    (lambda raw: raw[:100], "too short"),
]


@pytest.mark.parametrize("mutate, message", DAMAGED)
def test_damaged_copies_are_format_errors(tmp_path, bzimage, mutate, message):
    path = _damaged(tmp_path, bzimage, mutate)
    with pytest.raises(BootFormatError, match=message) as exc:
        bz.parse_bzimage(path)
    assert exc.value.exit_code == 2 and "\n" not in str(exc.value)


@pytest.mark.parametrize("mutate, message", DAMAGED[:5])  # the first five name a fix
def test_the_cli_names_the_kernel_and_the_fix(tmp_path, bzimage, capsys, mutate, message):
    """From the CLI, a format error is one line, exit status 2, with the file and a fix."""
    path = _damaged(tmp_path, bzimage, mutate)
    rc = cli.main(["boot", "--kernel", str(path), "--cpus", "1-2", "--memory", "512M@0x40000000",
                   "--console", "io:0x2f8", "--host-root", str(make_host_tree(tmp_path / "host")),
                   "--dry-run", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert f"kernel {path}: " in err and message in err
    assert "; pass a bzImage" in err or "; use " in err
    assert not (tmp_path / "out").exists()


def test_missing_kernel(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        bz.parse_bzimage(tmp_path / "nope")


def test_directory_is_not_a_kernel(tmp_path):
    with pytest.raises(UsageError, match="is a directory"):
        bz.parse_bzimage(tmp_path)
