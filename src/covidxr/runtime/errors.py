"""One exception type for every failure a user can fix (bad file, bad row, missing weights).

The CLI prints such errors as one line and exits non-zero; anything else is a bug.
"""

__all__ = ["CovidxrError", "ImageTooLarge"]


class CovidxrError(Exception):
    """A problem with the user's input, configuration or environment, stated in one sentence."""


class ImageTooLarge(CovidxrError):
    """An image over the pixel limit, refused before decoding (the web service answers 413 for it)."""
