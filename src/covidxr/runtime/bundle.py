"""Where the package keeps what it ships: the bundled model and the lung segmenter (``covidxr/bundled/``)."""

from pathlib import Path

__all__ = ["BUNDLED"]

BUNDLED = Path(__file__).resolve().parents[1] / "bundled"
