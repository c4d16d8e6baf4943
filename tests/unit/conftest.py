"""Unit-test fixtures.  Unit tests never download: the kernel they get is a synthetic bzImage."""

from __future__ import annotations

import pytest

from .bzimage_fixture import DEBIAN_SIZED, SyntheticKernel, write_bzimage
from .hosttree import make_host_tree


@pytest.fixture(scope="session")
def bzimage(tmp_path_factory):
    """Path of a synthetic bzImage (bzimage_fixture.py) that parses, plans and builds."""
    return write_bzimage(tmp_path_factory.mktemp("bzimage") / "vmlinuz-synthetic")


@pytest.fixture(scope="session")
def debian_kernel(tmp_path_factory):
    """A synthetic bzImage the size of the Debian kernel, under the name (and with the ``.vmlinuz``
    and ``.release`` of) the end-to-end fixture, so unit tests written against the Debian kernel
    run without fetching it.  Why the size matters: bzimage_fixture.DEBIAN_SIZED."""
    path = write_bzimage(tmp_path_factory.mktemp("debian-sized") / "vmlinuz-synthetic", **DEBIAN_SIZED)
    return SyntheticKernel(path)


@pytest.fixture
def host_tree(tmp_path):
    """A synthetic host tree (hosttree.py): the emulated machine's shape, 4 CPUs, two root buses."""
    return make_host_tree(tmp_path / "host")


@pytest.fixture
def initrd(tmp_path):
    """A small stand-in initramfs (its bytes are only copied, never unpacked)."""
    p = tmp_path / "initrd.img"
    p.write_bytes(b"\x07" * 300_000)
    return p
