"""Fixtures shared by unit and end-to-end tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def debian_kernel():
    """The stock Debian kernel the testbed uses, fetched into the cache on first use."""
    from coreslice.testbed.kernels import ensure_kernel

    return ensure_kernel()
