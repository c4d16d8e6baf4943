"""Unit-test fixtures."""

from __future__ import annotations

import pytest

from .bzimage_fixture import write_bzimage


@pytest.fixture(scope="session")
def bzimage(tmp_path_factory):
    """Path of a synthetic bzImage (bzimage_fixture.py) that parses, plans and builds."""
    return write_bzimage(tmp_path_factory.mktemp("bzimage") / "vmlinuz-synthetic")
