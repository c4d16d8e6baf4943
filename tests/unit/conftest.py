"""Unit-test fixtures.  Unit tests never download: the kernel they get is a synthetic bzImage."""

from __future__ import annotations

import pytest

from .bzimage_fixture import DEBIAN_SIZED, SyntheticKernel, write_bzimage


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
