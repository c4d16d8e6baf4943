"""Where the testbed keeps its cache: ``$CORESLICE_CACHE`` or ``~/.cache/coreslice``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Where the cache is (not created): ``$CORESLICE_CACHE`` or ``~/.cache/coreslice``."""
    env = os.environ.get("CORESLICE_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "coreslice").expanduser().resolve()


def cache_dir() -> Path:
    """The cache root (created on demand).  Kernels, initramfs images and runs live below it."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return root
