"""Where covidxr keeps what it can recompute (features, perceptual hashes); no heavy imports here."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_cache_dir"]


def default_cache_dir() -> Path:
    """``COVIDXR_CACHE_DIR``, else the user's cache folder (``~/.cache/covidxr``)."""
    value = os.environ.get("COVIDXR_CACHE_DIR")
    if value:
        return Path(value)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "covidxr"
