"""Counterfactual transplants (covidxr.lab.transplant) on real shared images: donors, look and regions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidxr.lab.blackbox import periphery_masks
from covidxr.lab.transplant import (
    choose_donors,
    down_up,
    effective_resolution,
    match_histogram,
    resized_like,
    transplanted,
)
from covidxr.runtime.images import read_image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def greys(folder: str, count: int) -> list[np.ndarray]:
    meta = pd.read_csv(SHARED / folder / "metadata.csv", dtype=str).head(count)
    return [np.asarray(read_image(SHARED / folder / name).convert("L")) for name in meta["filename"]]


def test_donors_come_from_the_right_class_and_source_and_never_the_image_itself() -> None:
    labels = ["COVID-19", "NORMAL", "COVID-19", "NORMAL", "PNEUMONIA", "COVID-19"]
    sources = ["a", "a", "a", "b", "b", "c"]
    donors = choose_donors(labels, sources, "COVID-19", seed=0)
    for i in range(len(labels)):
        covid, other = donors["covid"][i], donors["other"][i]
        assert covid != i and other != i
        assert labels[covid] == "COVID-19" and labels[other] != "COVID-19"
    assert sources[donors["covid"][1]] == "a" and sources[donors["other"][0]] == "a"  # same source where it can
    assert sources[donors["other"][5]] in {"a", "b"}  # source c holds no other class: any source
    again = choose_donors(labels, sources, "COVID-19", seed=0)
    assert all((again[k] == donors[k]).all() for k in donors)  # seeded


def test_the_effective_resolution_of_a_film_and_of_one_enlarged_from_a_quarter() -> None:
    [film] = greys("adult-controls", 1)
    assert effective_resolution(film) < 4
    assert effective_resolution(down_up(film, 4)) >= 4


def test_a_matched_histogram_takes_the_references_grey_levels() -> None:
    film, reference = greys("cxr3", 2)
    matched = match_histogram(film, reference)
    assert matched.shape == film.shape and matched.dtype == np.uint8
    for q in (10, 50, 90):
        assert abs(np.percentile(matched, q) - np.percentile(reference, q)) <= 3
    # The order of grey levels is kept: brighter stays brighter.
    assert np.corrcoef(film.ravel(), matched.ravel())[0, 1] > 0.9


@pytest.mark.parametrize("region", ["corners", "border", "text", "lungs"])
def test_a_region_comes_from_the_donor_and_the_rest_stays(region: str) -> None:
    film, other = greys("adult-controls", 2)
    donor = resized_like(other, film.shape)
    lungs = np.zeros(film.shape, dtype=bool)
    lungs[film.shape[0] // 4 : 3 * film.shape[0] // 4, film.shape[1] // 5 : 4 * film.shape[1] // 5] = True
    masks = {**periphery_masks(film, lungs), "lungs": lungs}
    made = transplanted(film, donor, 1, masks)
    inside = masks[region]
    assert inside.any()
    assert np.array_equal(made[region][inside], donor[inside])
    assert np.array_equal(made[region][~inside], film[~inside])
    # The shortcut-free variant keeps the recipient's lungs and takes the donor's corners.
    assert np.array_equal(made["shortcut_free"][masks["corners"]], donor[masks["corners"]])
