"""Counterfactual transplants: does the model's answer follow the chest, or a part of the image that should not matter?

Hiding a region (``covidxr.lab.blackbox``'s neutral fill) tells how much a model is disturbed by an image it
never saw, which a sound model with frozen ImageNet features also is: on the planted-shortcut benchmark a
clean control flipped 25% of its decisions with the periphery filled, as many as a marker model. A
transplant asks the causal question instead. Each image gets one region from a *donor*: once from a
COVID-19 image and once from an image of another class (from the same source where it has both, so the
source stays put). The region's **effect** is the mean change of p(COVID-19) between the two::

    effect(region) = mean_i [ p(image_i with region from a COVID-19 donor) - p(... from another donor) ]

A model that reads the chest has a large effect for the lungs. A model that reads a corner marker, a border
band or burnt-in text has a large effect there, and only where the data's COVID-19 images carry the marker
more often than the others: a sound model's corners carry no label, so their effect stays near 0 whatever
the model is sensitive to. The **look** (grey-level histogram and effective resolution) is transplanted
the same way: the recipient's grey levels matched to the donor's, and reduced to the donor's resolution.

Transplants also give the audit's estimate of accuracy without the shortcut: every image given the periphery
and look of a donor of one class, the shortcut (wherever it sits outside the lungs) follows that class, not
the image's; for the class whose images lack the shortcut this is accuracy off the shortcut.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = [
    "DONOR_CLASSES",
    "REGIONS",
    "choose_donors",
    "down_up",
    "effective_resolution",
    "match_histogram",
    "resized_like",
    "transplanted",
]

REGIONS = ("lungs", "corners", "border", "text", "look")
DONOR_CLASSES = ("covid", "other")
# Down-up factors tried for an image's effective resolution, and the mean absolute grey change (of 255) under
# which a factor loses nothing: a full-resolution 512-px film changes 1.75-1.9 levels at x2 (NIH), one enlarged
# from a quarter of its size 1.1 levels at x4 (bilinear phases) and 2.1 at x6.
RESOLUTION_FACTORS = (2, 3, 4, 6, 8)
RESOLUTION_TOLERANCE = 1.25


def choose_donors(labels: Sequence[str], sources: Sequence[str], covid: str, seed: int) -> dict[str, np.ndarray]:
    """For every image, a COVID-19 donor and a donor of another class: from its own source where that source
    holds such an image, else from any source; never itself. Seeded."""
    rng = np.random.default_rng(seed + 7)
    labels, sources = np.asarray(labels, dtype=object), np.asarray(sources, dtype=object)
    is_covid = labels == covid
    donors = {}
    for name, members in (("covid", is_covid), ("other", ~is_covid)):
        chosen = np.full(len(labels), -1)
        for i in range(len(labels)):
            pool = np.flatnonzero(members & (sources == sources[i]))
            pool = pool[pool != i]
            if not len(pool):
                pool = np.flatnonzero(members)
                pool = pool[pool != i]
            chosen[i] = rng.choice(pool) if len(pool) else -1
        donors[name] = chosen
    return donors


def down_up(grey: np.ndarray, factor: int) -> np.ndarray:
    """``grey`` reduced ``factor`` times and enlarged back (bilinear): the detail of a low-resolution collection."""
    image = Image.fromarray(grey)
    small = image.resize(
        (max(1, image.width // factor), max(1, image.height // factor)), Image.Resampling.BILINEAR, reducing_gap=None
    )
    return np.asarray(small.resize(image.size, Image.Resampling.BILINEAR))


def effective_resolution(grey: np.ndarray) -> int:
    """The largest down-up factor that leaves ``grey`` nearly unchanged: 1 for a film with full detail, 4 for
    one enlarged from a quarter of its size."""
    found = 1
    for factor in RESOLUTION_FACTORS:
        if np.abs(down_up(grey, factor).astype(np.float32) - grey).mean() < RESOLUTION_TOLERANCE:
            found = factor
    return found


def match_histogram(grey: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``grey`` with the grey-level distribution of ``reference`` (quantile mapping)."""
    values, index, counts = np.unique(grey.ravel(), return_inverse=True, return_counts=True)
    ref_values, ref_counts = np.unique(reference.ravel(), return_counts=True)
    mapped = np.interp(np.cumsum(counts) / grey.size, np.cumsum(ref_counts) / reference.size, ref_values)
    return np.round(mapped[index]).reshape(grey.shape).astype(np.uint8)


def resized_like(donor: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``donor`` at ``shape`` (bilinear), so its regions line up with the recipient's."""
    if donor.shape == shape:
        return donor
    return np.asarray(Image.fromarray(donor).resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def transplanted(
    grey: np.ndarray, donor: np.ndarray, donor_resolution: int, masks: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``grey`` with each of ``REGIONS`` taken from ``donor`` (``masks``: the lungs, corners, border and text to
    take; text should be the recipient's and the donor's together, so burnt-in text moves wherever it sits),
    plus ``shortcut_free``: the whole periphery and the look from the donor, the lungs kept."""
    source = resized_like(donor, grey.shape)
    out = {}
    for region in ("lungs", "corners", "border", "text"):
        image = grey.copy()
        image[masks[region]] = source[masks[region]]
        out[region] = image
    look = match_histogram(grey, source)
    if donor_resolution > 1:
        look = down_up(look, donor_resolution)
    out["look"] = look
    periphery = masks["corners"] | masks["border"] | masks["text"]
    both = look.copy()
    both[periphery] = source[periphery]
    out["shortcut_free"] = both
    return out
