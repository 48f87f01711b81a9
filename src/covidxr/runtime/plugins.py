"""How the runtime reaches the lab's code without importing it: entry points that ``pyproject.toml`` declares
(``covidxr.runners``: the torch and int8 runners; ``covidxr.cam``: pytorch-grad-cam methods; ``covidxr.lungs``:
the segmenter in torch where onnxruntime is missing), loaded by name when first needed."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points

from covidxr.runtime.errors import CovidxrError

__all__ = ["entry_point"]


def entry_point(group: str, name: str) -> Callable:
    """What the installed packages declare as ``name`` in the entry-point ``group``."""
    found = [point for point in entry_points(group=group) if point.name == name]
    if not found:
        raise CovidxrError(f"nothing named {name!r} is installed in the entry points {group}")
    return found[0].load()
