"""Setup-header parsing: the declaration against boot.rst, a synthetic bzImage, damaged copies."""

from __future__ import annotations

import ctypes

import pytest

from coreslice import cli
from coreslice.boot import bzimage as bz  # the name bzimage is the fixture's
from coreslice.boot.errors import BootFormatError
from coreslice.boot.structs import SetupHeader
from coreslice.errors import UsageError

from .bzimage_fixture import INIT_SIZE, PAYLOAD_SIZE, RELEASE, SETUP_SECTS, write_bzimage
from .hosttree import make_host_tree

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
    (_set("version", 0x0209), "boot protocol 2.09 is too old"),
    (_set("xloadflags", 0), "no 64-bit entry"),
    (_set("relocatable_kernel", 0), "not relocatable"),
    (_set("jump", 0x10EB), "setup header length 0x21 is implausible"),
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


@pytest.mark.parametrize("mutate, message", DAMAGED[:5])
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
