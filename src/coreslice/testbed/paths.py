"""Where the testbed keeps its cache: ``$CORESLICE_CACHE`` or ``~/.cache/coreslice``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root (created on demand).  Kernels, initramfs images and runs live below it."""
    env = os.environ.get("CORESLICE_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "coreslice"
    root = root.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root
