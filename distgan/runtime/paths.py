"""Where distgan keeps what it computes once and reuses (the rendered built-in faces, image scans,
real FID statistics): the cache folder. Imports no torch."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$DISTGAN_CACHE, else ~/.cache/distgan (a run's --cache-dir overrides both)."""
    return Path(os.environ.get("DISTGAN_CACHE") or Path.home() / ".cache" / "distgan")
