"""Shortcut-resistant preprocessing and acquisition augmentation, on real chest X-rays."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from covidxr.lab.augment import AcquisitionAugment
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import read_image
from covidxr.runtime.preprocess import INTENSITY_METHODS, ImagePipeline
from tests.conftest import ADULT_CONTROLS, CXR3

LOW_CONTRAST = "images/ieee8023_16669_1_1.jpg"  # 512 x 427, grey-level standard deviation ~24
SMALL = "images/ieee8023_yxppt-2020-02-19_00-51-27_287214-day8.jpg"  # 331 x 324
NIH = "images/nih_00000061_012.jpg"  # 512 x 512, adult control with dark upper corners
ALL_OFF = AcquisitionAugment(
    contrast=0, gamma=0, blur_sigma=0, noise=0, jpeg_quality=(100, 100), rotation=0, scale=0, hflip=False
)


def _real(root: Path, name: str) -> Image.Image:
    path = root / name
    if not path.is_file():
        pytest.fail(f"real image not found: {path}")
    return read_image(path)


@pytest.fixture(scope="module")
def low_contrast() -> Image.Image:
    return _real(CXR3, LOW_CONTRAST)


@pytest.fixture(scope="module")
def nih() -> Image.Image:
    return _real(ADULT_CONTROLS, NIH)


def _grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float64)


def _local_contrast(image: Image.Image) -> float:
    grey = _grey(image)
    return float(np.abs(grey - ndimage.gaussian_filter(grey, 4)).mean())


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# --------------------------------------------------------------------------------------------- options


def test_identity_pipeline_returns_the_same_pixels(nih: Image.Image) -> None:
    pipeline = ImagePipeline()
    assert pipeline.is_identity and pipeline.describe() == "none"
    out = pipeline(nih)
    assert out.mode == "RGB" and out.size == nih.size
    assert np.array_equal(np.asarray(out), np.asarray(nih))
    assert not ImagePipeline(intensity="zscore").is_identity
    assert not ImagePipeline(mask_text=True).is_identity


@pytest.mark.parametrize(
    "pipeline",
    [ImagePipeline(), ImagePipeline("clahe", 192, True, True), ImagePipeline(intensity="zscore", crop_thorax=True)],
)
def test_pipeline_round_trips_through_dict_json_yaml_and_pickle(pipeline: ImagePipeline) -> None:
    data = pipeline.to_dict()
    assert set(data) == {"intensity", "effective_resolution", "crop_thorax", "mask_text"}
    assert ImagePipeline.from_dict(data) == pipeline
    assert ImagePipeline.from_dict(json.loads(json.dumps(data))) == pipeline
    assert ImagePipeline.from_dict(yaml.safe_load(yaml.safe_dump(data))) == pipeline
    assert pickle.loads(pickle.dumps(pipeline)) == pipeline
    assert ImagePipeline.from_dict(None) == ImagePipeline.from_dict({}) == ImagePipeline()


def test_describe_names_each_step() -> None:
    assert ImagePipeline("clahe", 192, True).describe() == "CLAHE, effective resolution 192 px, thorax crop"
    assert "text" in ImagePipeline(mask_text=True).describe()
    for method in INTENSITY_METHODS[1:]:
        assert ImagePipeline(method).describe() != "none"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"intensity": "foo"}, "'foo'"),
        ({"intensity": None}, "None"),
        ({"effective_resolution": 5}, "5"),
        ({"effective_resolution": -192}, "-192"),
        ({"effective_resolution": 192.5}, "192.5"),
        ({"crop_thorax": "yes"}, "'yes'"),
    ],
)
def test_bad_pipeline_values_are_refused_by_name(kwargs: dict, needle: str) -> None:
    with pytest.raises(CovidxrError) as info:
        ImagePipeline(**kwargs)
    message = str(info.value)
    assert needle in message and "\n" not in message
    with pytest.raises(CovidxrError, match="colour"):
        ImagePipeline.from_dict({"intensity": "clahe", "colour": True})


def test_bad_augment_values_are_refused_by_name() -> None:
    for kwargs, needle in [
        ({"contrast": 1.5}, "1.5"),
        ({"rotation": -3}, "-3"),
        ({"noise": float("nan")}, "nan"),
        ({"jpeg_quality": (95, 30)}, "(95, 30)"),
        ({"jpeg_quality": (0, 50)}, "(0, 50)"),
        ({"hflip": "no"}, "'no'"),
    ]:
        with pytest.raises(CovidxrError) as info:
            AcquisitionAugment(**kwargs)
        assert needle in str(info.value), (kwargs, str(info.value))
    with pytest.raises(CovidxrError, match="mirror"):
        AcquisitionAugment.from_dict({"mirror": True})


def test_augment_round_trips_through_dict_json_and_yaml() -> None:
    augment = AcquisitionAugment(contrast=0.1, jpeg_quality=(50, 90), hflip=True)
    data = augment.to_dict()
    assert data["jpeg_quality"] == [50, 90]
    assert yaml.safe_load(yaml.safe_dump(data)) == data
    assert AcquisitionAugment.from_dict(json.loads(json.dumps(data))) == augment
    assert AcquisitionAugment.from_dict(None) == AcquisitionAugment.from_dict({}) == AcquisitionAugment()
    assert pickle.loads(pickle.dumps(augment)) == augment


# --------------------------------------------------------------------------------------------- intensity


@pytest.mark.parametrize("method", ["clahe", "equalize"])
def test_equalisation_raises_contrast_of_a_low_contrast_xray(low_contrast: Image.Image, method: str) -> None:
    out = ImagePipeline(intensity=method)(low_contrast)
    assert out.mode == "RGB" and out.size == low_contrast.size
    before, after = _grey(low_contrast), _grey(out)
    spread = np.percentile(after, 95) - np.percentile(after, 5)
    assert spread > 1.25 * (np.percentile(before, 95) - np.percentile(before, 5))
    assert _local_contrast(out) > 2.0 * _local_contrast(low_contrast)
    rgb = np.asarray(out)
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])


@pytest.mark.parametrize("root,name", [(CXR3, LOW_CONTRAST), (ADULT_CONTROLS, NIH)])
def test_zscore_gives_mean_128_and_spread_64(root: Path, name: str) -> None:
    out = _grey(ImagePipeline(intensity="zscore")(_real(root, name)))
    assert abs(out.mean() - 128) < 4
    assert 52 < out.std() < 68  # 64 before clipping values beyond +-2 standard deviations


@pytest.mark.parametrize("method", INTENSITY_METHODS)
def test_constant_image_stays_finite(method: str) -> None:
    blank = Image.new("RGB", (64, 48), (90, 90, 90))
    out = np.asarray(ImagePipeline(intensity=method)(blank))
    assert out.shape == (48, 64, 3) and np.isfinite(out).all()
    if method == "zscore":
        assert (out == 128).all()


# --------------------------------------------------------------------------------------------- resolution


def test_effective_resolution_downsamples_keeping_the_aspect_ratio(nih: Image.Image, low_contrast: Image.Image) -> None:
    assert ImagePipeline(effective_resolution=192)(nih).size == (192, 192)
    out = ImagePipeline(effective_resolution=192)(low_contrast)
    assert max(out.size) == 192
    assert out.size[0] / out.size[1] == pytest.approx(low_contrast.size[0] / low_contrast.size[1], rel=0.01)


def test_effective_resolution_never_upsamples() -> None:
    small = _real(CXR3, SMALL)
    assert max(small.size) < 384
    out = ImagePipeline(effective_resolution=384)(small)
    assert out.size == small.size
    assert np.array_equal(np.asarray(out), np.asarray(small))


# --------------------------------------------------------------------------------------------- thorax crop


def test_crop_thorax_removes_a_black_frame_and_a_white_strip(nih: Image.Image) -> None:
    frame, strip = 60, 25
    width, height = nih.size
    padded = Image.new("RGB", (width + 2 * frame + strip, height + 2 * frame), (0, 0, 0))
    padded.paste(nih, (frame + strip, frame))
    padded.paste((255, 255, 255), (frame // 2, 0, frame // 2 + strip, padded.height))  # a white strip, full height
    crop = ImagePipeline(crop_thorax=True)
    out, plain = crop(padded), crop(nih)
    assert out.width <= width and out.height <= height
    assert out.width >= 0.8 * width and out.height >= 0.8 * height
    assert abs(out.width - plain.width) <= 2 and abs(out.height - plain.height) <= 2  # the frame made no difference
    grey = _grey(out)
    for edge in (grey[0], grey[-1], grey[:, 0], grey[:, -1]):
        assert edge.std() > 5 and 5 < edge.mean() < 250  # no black frame or white strip left on any side


@pytest.mark.parametrize("colour", [(0, 0, 0), (255, 255, 255), (128, 128, 128)])
def test_crop_thorax_leaves_a_blank_image_alone(colour: tuple[int, int, int]) -> None:
    blank = Image.new("RGB", (300, 200), colour)
    out = ImagePipeline(crop_thorax=True)(blank)
    assert out.size == blank.size
    assert np.array_equal(np.asarray(out), np.asarray(blank))


# --------------------------------------------------------------------------------------------- text masking


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a small bitmap font only
        return ImageFont.load_default()


def test_mask_text_removes_burnt_in_labels_and_spares_the_lungs(nih: Image.Image) -> None:
    labelled = nih.copy()
    draw = ImageDraw.Draw(labelled)
    draw.text((40, 30), "PORTABLE", fill=(255, 255, 255), font=_font(36))
    draw.text((440, 35), "L", fill=(255, 255, 255), font=_font(40))
    original, drawn = _grey(nih), _grey(labelled)
    text = np.abs(drawn - original) > 20
    assert text.sum() > 500

    out = ImagePipeline(mask_text=True)(labelled)
    assert out.size == nih.size and out.mode == "RGB"
    masked = _grey(out)
    before = np.abs(drawn - original)[text].mean()
    after = np.abs(masked - original)[text].mean()
    assert before > 80 and after < 0.3 * before, (before, after)

    centre = (slice(int(0.3 * nih.height), int(0.7 * nih.height)), slice(int(0.3 * nih.width), int(0.7 * nih.width)))
    assert np.array_equal(masked[centre], original[centre])  # the lung fields are left exactly alone

    band = round(0.03 * nih.width)
    edges = np.concatenate([masked[:band].ravel(), masked[-band:].ravel(), masked[:, :band].ravel()])
    assert edges.std() == 0  # a thin border band filled with one value, the image median


def test_mask_text_leaves_an_image_without_labels_inside_the_band_nearly_alone(low_contrast: Image.Image) -> None:
    # The real image carries a circled "L" and "PORT" at the right: those go, the rest of the interior stays.
    out = _grey(ImagePipeline(mask_text=True)(low_contrast))
    original = _grey(low_contrast)
    band = round(0.03 * max(low_contrast.size))
    inner = (slice(band, -band), slice(band, -band))
    changed = (out[inner] != original[inner]).mean()
    assert 0 < changed < 0.03
    assert original[90:150, 455:505].max() > 240 and out[90:150, 455:505].max() < 230  # the markers are gone


def test_full_pipeline_gives_a_small_grey_rgb_image(nih: Image.Image) -> None:
    out = ImagePipeline("clahe", 192, True, True)(nih)
    rgb = np.asarray(out)
    assert out.mode == "RGB" and max(out.size) == 192 and min(out.size) > 100
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])


# --------------------------------------------------------------------------------------------- augmentation


def test_augment_is_deterministic_given_the_seed(nih: Image.Image) -> None:
    augment = AcquisitionAugment()
    first = np.asarray(augment(nih, np.random.default_rng(7)))
    again = np.asarray(augment(nih, np.random.default_rng(7)))
    other = np.asarray(augment(nih, np.random.default_rng(8)))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first, np.asarray(nih))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_augment_keeps_size_and_mode(low_contrast: Image.Image, mode: str) -> None:
    image = low_contrast.convert(mode)
    for seed in range(3):
        out = AcquisitionAugment(jpeg_quality=(30, 60))(image, np.random.default_rng(seed))
        assert out.size == image.size and out.mode == image.mode


def test_augment_does_not_mirror_unless_asked(nih: Image.Image) -> None:
    grey = _grey(nih)
    mirrored = grey[:, ::-1]
    for seed in range(6):
        out = _grey(AcquisitionAugment()(nih, np.random.default_rng(seed)))
        assert _correlation(out, grey) > _correlation(out, mirrored) + 0.04
    flipped = [
        _correlation(out, mirrored) > _correlation(out, grey)
        for out in (_grey(AcquisitionAugment(hflip=True)(nih, np.random.default_rng(s))) for s in range(8))
    ]
    assert any(flipped) and not all(flipped)


def test_augment_with_every_component_off_returns_the_input_exactly(nih: Image.Image) -> None:
    for seed in range(3):
        out = ALL_OFF(nih, np.random.default_rng(seed))
        assert out is not nih and np.array_equal(np.asarray(out), np.asarray(nih))


@pytest.mark.parametrize(
    "component",
    [
        {"contrast": 0.3},
        {"gamma": 0.4},
        {"blur_sigma": 2.0},
        {"noise": 0.05},
        {"jpeg_quality": (10, 20)},
        {"rotation": 10.0},
        {"scale": 0.2},
    ],
)
def test_each_augment_component_changes_the_image_on_its_own(low_contrast: Image.Image, component: dict) -> None:
    augment = AcquisitionAugment(**{**ALL_OFF.to_dict(), **component})
    original = np.asarray(low_contrast)
    outputs = [np.asarray(augment(low_contrast, np.random.default_rng(seed))) for seed in range(4)]
    assert any(not np.array_equal(out, original) for out in outputs)  # blur and JPEG apply with probability 0.5
    for out in outputs:
        assert out.shape == original.shape
        # Still the same X-ray (rotation and zoom move pixels and pad corners, so they correlate less).
        floor = 0.4 if {"rotation", "scale"} & set(component) else 0.8
        assert _correlation(_grey(Image.fromarray(out)), _grey(low_contrast)) > floor


def test_augment_zoom_out_pads_with_the_image_median_not_black(nih: Image.Image) -> None:
    augment = AcquisitionAugment(**{**ALL_OFF.to_dict(), "scale": 0.3})
    original = _grey(nih)
    median = np.median(original)
    assert original[0, 0] < median - 50  # the NIH image has a dark corner
    corners = [_grey(augment(nih, np.random.default_rng(seed)))[0, 0] for seed in range(10)]
    assert any(corner == median for corner in corners)  # zoomed out: the uncovered corner gets the median
    assert any(corner != median for corner in corners)  # zoomed in: it is cropped
