"""covidxr: COVID-19 chest X-ray classification by transfer learning, with honest numbers.

Research use only. Not a medical device; never use its output for diagnosis.

    >>> import covidxr
    >>> model = covidxr.load_model()             # the bundled model, or load_model("runs/lite0")
    >>> result = model.predict("chest.png")      # one image: one dict; a list: a list of dicts
    >>> result["label"], result["probabilities"], result["no_answer_reason"]

``label`` is the decision (COVID-19 when its calibrated probability reaches the model's operating
threshold, otherwise the more probable other class); it is ``None``, with ``no_answer_reason``, for an
image unlike the training X-rays. The command line is ``covidxr --help``.
"""

__version__ = "0.1.0"

DISCLAIMER = "Research use only: not a medical device, not for diagnosis or patient care."


__all__ = ["DISCLAIMER", "CovidxrError", "Model", "__version__", "load_model"]

_LAZY = {"load_model", "Model", "CovidxrError"}


def __getattr__(name: str):
    """``covidxr.load_model``, ``covidxr.Model`` and ``covidxr.CovidxrError``, imported on first use
    (``import covidxr`` stays instant; the runtime loads numpy and onnxruntime only when used)."""
    if name in _LAZY:
        from covidxr.runtime import api

        return getattr(api, name)
    raise AttributeError(f"module 'covidxr' has no attribute {name!r}")


def __dir__() -> list[str]:
    """What ``dir(covidxr)`` and ``help(covidxr)`` list: the public API, lazy names included."""
    return sorted(set(globals()) | _LAZY)
