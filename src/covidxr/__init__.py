"""covidxr: COVID-19 chest X-ray classification by transfer learning, with honest numbers.

Research use only. Not a medical device; never use its output for diagnosis.
"""

__version__ = "0.1.0"

DISCLAIMER = "Research use only: not a medical device, not for diagnosis or patient care."


def __getattr__(name: str):
    """``covidxr.load_model`` and ``covidxr.Model``, imported on first use (torch is slow to import)."""
    if name in {"load_model", "Model"}:
        from covidxr import api

        return getattr(api, name)
    raise AttributeError(f"module 'covidxr' has no attribute {name!r}")
