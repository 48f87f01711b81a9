"""Deprecated path: the Python API lives in ``covidxr.runtime.api``; use ``covidxr.load_model`` (kept
so that ``from covidxr.api import load_model`` written before the runtime/lab layout still works)."""

from covidxr.runtime.api import *  # noqa: F403
from covidxr.runtime.api import __all__  # noqa: F401
