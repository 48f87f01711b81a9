"""Shortcut-resistant image preprocessing and acquisition-look augmentation.

Public COVID-19 chest X-ray collections mix sources: the COVID-19 images come from papers and
websites (adults, portable scanners, burnt-in "L"/"PORTABLE" markers, screenshots with borders),
the normal and pneumonia images largely from one paediatric hospital. A network trained on such
data learns the hospital and the scanner (grey-level curve, sharpness, compression, text, borders,
image size) as readily as the disease. The tools here take those cues away:

* ``ImagePipeline`` is deterministic and runs at training *and* prediction time: it masks text and
  markers, crops to the chest, caps the effective resolution and normalises the grey levels.
* ``AcquisitionAugment`` is random and runs at training time only: it varies contrast, gamma,
  sharpness, noise, JPEG compression and positioning, so none of them can identify a source.

Both take and return 8-bit RGB PIL images with the grey value replicated over the channels (what
``covidxr.runtime.images.read_image`` produces), so they slot in before the model's resize and normalisation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.lungs import find_lungs

__all__ = [
    "INTENSITY_METHODS",
    "ImagePipeline",
    "InputTransform",
    "LUNGS_REASON",
    "LUNG_CROP_MARGIN",
    "LUNG_MASK_FILL",
    "LUNG_MASK_GROW",
    "LUNG_MASK_SOFTEN",
    "LUNG_MODES",
    "MIN_EFFECTIVE_RESOLUTION",
    "PREPROCESSING",
    "Preprocessing",
    "luma",
    "to_input_array",
]

INTENSITY_METHODS = ("none", "clahe", "equalize", "zscore")
LUNG_MODES = ("none", "crop", "mask")
# Lung-only input (covidxr.runtime.lungs). crop: the two lungs' bounding box widened by this share of its size on
# every side (apices, costophrenic angles and the lung edges stay in). mask: the lungs widened by
# LUNG_MASK_GROW of the image side, then blended into LUNG_MASK_FILL over a blur of LUNG_MASK_SOFTEN of it.
LUNG_CROP_MARGIN = 0.08
LUNG_MASK_GROW = 0.02
LUNG_MASK_SOFTEN = 0.015
LUNG_MASK_FILL = 0
LUNGS_REASON = "lungs"  # key in a processed image's ``info``: why no lungs were found, when they were not
MIN_EFFECTIVE_RESOLUTION = 32

_INTENSITY_NAMES = {"clahe": "CLAHE", "equalize": "histogram equalisation", "zscore": "z-score intensity"}

# CLAHE (skimage.exposure.equalize_adapthist): contrast clip limit, and 256 grey-level bins.
CLAHE_CLIP_LIMIT = 0.01
# z-score: a grey value of 128 + ZSCORE_SPREAD * z, clipped to 0..255 (so +-2 standard deviations fit).
ZSCORE_SPREAD = 64.0

# Thorax crop. A row (column) holds image content when its grey values vary (standard deviation of at
# least CROP_MIN_STD) and at least CROP_MIN_MID_FRACTION of its pixels are neither near black nor near
# white; frames, scanner borders and white strips fail one of the two tests.
CROP_MIN_STD = 6.0
CROP_DARK_LEVEL = 12
CROP_BRIGHT_LEVEL = 243
CROP_MIN_MID_FRACTION = 0.10
CROP_MIN_RUN = 5  # isolated content rows/columns shorter than this are ignored (noise, text in a frame)
# Of the content box, keep the central 90% of the width and 95% of the height: this trims arms,
# shoulders, collimator edges and the markers that sit there, but keeps both lungs and the apices.
CROP_WIDTH_FRACTION = 0.90
CROP_HEIGHT_FRACTION = 0.95
# A content box smaller than this fraction of either side (or than MIN_EFFECTIVE_RESOLUTION pixels)
# is not trusted: the image is returned uncropped.
CROP_MIN_BOX_FRACTION = 0.20

# Text and marker masking.
TEXT_SEED_LEVEL = 235  # burnt-in text is drawn in (near) full white: every blob must reach this level ...
TEXT_MIN_LEVEL = 160  # ... and it takes in its bright, anti-aliased surroundings down to this level ...
TEXT_MIN_CONTRAST = 60  # ... and much brighter than its neighbourhood once thin details are removed
TEXT_MIN_BLOB_CONTRAST = 85  # (on average over the blob: rib edges and the like reach only about 65-75) ...
TEXT_STROKE_FRACTION = 0.03  # ... (a grey opening over 3% of the image side: the white top-hat)
TEXT_DARK_LEVEL = 40  # the plate or disc a marker is printed on is near black ...
TEXT_MAX_PLATE_FRACTION = 0.05  # ... and covers at most 5% of the image and half its width or height
TEXT_MAX_PLATE_SIDE = 0.50
TEXT_MAX_BLOB_FRACTION = 0.01  # one glyph/marker covers at most 1% of the image ...
TEXT_MAX_BLOB_SIDE = 0.20  # ... spans at most 20% of the width or of the height ...
TEXT_MAX_LINE_SIDE = 0.50  # ... and at most half of the other (a line of touching letters)
TEXT_EDGE_ZONE = 0.25  # only blobs centred within 25% of an edge count; the central lung field is left alone
TEXT_DILATION = 3  # pixels added around each blob to catch anti-aliased and JPEG-smeared edges
TEXT_SAMPLE_GAP = 3  # masked pixels are filled from the nearest pixels this far outside the mask
BORDER_FRACTION = 0.03  # a band of 3% of each side is filled with the image median


def _ndimage():
    """scipy.ndimage, for the training-side options (thorax crop, text masking, augmentation) only: the
    runtime install has no scipy, and the pipelines it runs (intensity, resolution, lungs) do not need it."""
    try:
        from scipy import ndimage
    except ImportError:
        raise CovidxrError("this image pipeline option needs scipy: pip install 'covidxr[train]'") from None
    return ndimage


def _error(owner: str, message: str) -> CovidxrError:
    return CovidxrError(f"{owner}: {message}")


def _check_keys(owner: str, cls: type, data: Mapping[str, Any] | None) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise _error(owner, f"expected a mapping of options, not {type(data).__name__} {data!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise _error(owner, f"unknown option(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
    return dict(data)


def luma(image: Image.Image) -> np.ndarray:
    """The image as a 2-D uint8 array (the luma of an RGB image; for replicated grey, the grey itself), read-only."""
    return np.asarray(image if image.mode == "L" else image.convert("L"), dtype=np.uint8)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Deterministic pipeline
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImagePipeline:
    """Deterministic preprocessing, applied at training AND prediction time.

    ``intensity``: grey-level normalisation, one of ``INTENSITY_METHODS``. ``effective_resolution``:
    0 = off, else downsample so the longest side is at most this many pixels (never upsample); the
    image is returned at that size. ``crop_thorax``: crop to the content bounding box, then to a
    centred chest crop of it. ``mask_text``: replace burnt-in text and markers by the local
    background and fill a thin border band with the image median.
    """

    intensity: str = "none"
    effective_resolution: int = 0
    crop_thorax: bool = False
    mask_text: bool = False
    lungs: str = "none"
    # Where lung masks are cached (training); not an option of the pipeline, so not in its key.
    lung_cache: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        owner = "image pipeline"
        if self.lungs not in LUNG_MODES:
            raise _error(owner, f"unknown lungs {self.lungs!r}; choose one of {', '.join(LUNG_MODES)}")
        if not isinstance(self.intensity, str) or self.intensity.lower() not in INTENSITY_METHODS:
            raise _error(owner, f"unknown intensity {self.intensity!r}; choose one of {', '.join(INTENSITY_METHODS)}")
        object.__setattr__(self, "intensity", self.intensity.lower())
        resolution = self.effective_resolution
        if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
            raise _error(owner, f"effective_resolution must be a whole number of pixels, not {resolution!r}")
        if resolution != 0 and resolution < MIN_EFFECTIVE_RESOLUTION:
            raise _error(
                owner,
                f"effective_resolution must be 0 (off) or at least {MIN_EFFECTIVE_RESOLUTION} pixels, not {resolution}",
            )
        object.__setattr__(self, "effective_resolution", int(resolution))
        for name in ("crop_thorax", "mask_text"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise _error(owner, f"{name} must be true or false, not {value!r}")
            object.__setattr__(self, name, bool(value))

    @property
    def is_identity(self) -> bool:
        """True when the pipeline leaves every image unchanged."""
        return self == ImagePipeline()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able options (``lungs`` only when used, so keys made before it stay valid)."""
        options = asdict(self)
        options.pop("lung_cache")
        if self.lungs == "none":
            options.pop("lungs")
        return options

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ImagePipeline:
        """Options from ``to_dict`` (or a config file); ``None`` or ``{}`` is the identity pipeline."""
        return cls(**_check_keys("image pipeline", cls, data))

    def describe(self) -> str:
        """Short human text, e.g. ``"CLAHE, effective resolution 192 px, thorax crop"``; ``"none"`` for identity."""
        parts = []
        if self.intensity != "none":
            parts.append(_INTENSITY_NAMES[self.intensity])
        if self.effective_resolution:
            parts.append(f"effective resolution {self.effective_resolution} px")
        if self.crop_thorax:
            parts.append("thorax crop")
        if self.mask_text:
            parts.append("text and marker masking")
        if self.lungs != "none":
            parts.append({"crop": "cropped to the lungs", "mask": "lungs only (outside masked)"}[self.lungs])
        return ", ".join(parts) or "none"

    def __call__(self, image: Image.Image) -> Image.Image:
        """Apply the steps in the order mask_text -> crop_thorax -> effective_resolution -> intensity.

        Text is found at full resolution, where glyphs are sharp and saturated, and is removed before
        the crop so that markers and the filled border band cannot widen the content box. The crop
        comes before the resolution cap so that the cap applies to the chest, not to the frame around
        it. Intensity normalisation comes last so that the grey-level statistics the model sees
        (equalised histogram, z-score mean and spread) hold exactly in the returned image and are
        not computed over text, borders or frame. The identity pipeline returns the input unchanged.
        """
        processed = self.process(image)
        return processed if processed.mode == "RGB" else processed.convert("RGB")

    def process(self, image: Image.Image, grey: np.ndarray | None = None) -> Image.Image:
        """As calling the pipeline, but a grey result stays in mode ``L``: the model's input path then
        resizes and normalises one band instead of three identical ones (same numbers, a third of the work).
        ``grey``: the image's ``luma`` where the caller already made it (the checks after use it too)."""
        if self.is_identity:
            return image if image.mode in {"RGB", "L"} else image.convert("RGB")
        grey = luma(image) if grey is None else grey
        reason = None
        if self.lungs != "none":
            grey, reason = lung_input(grey, self.lungs, self.lung_cache)
        if self.mask_text:
            grey = mask_text(grey)
        if self.crop_thorax:
            grey = crop_thorax(grey)
        if self.effective_resolution:
            grey = limit_resolution(grey, self.effective_resolution)
        if self.intensity != "none":
            grey = normalise_intensity(grey, self.intensity)
        processed = Image.fromarray(grey, mode="L")
        if reason:
            processed.info[LUNGS_REASON] = reason
        return processed


def lung_input(grey: np.ndarray, mode: str, cache_dir: str | None = None) -> tuple[np.ndarray, str | None]:
    """The image cut down to its lungs (``crop`` or ``mask``), or unchanged with the reason the bundled
    segmenter found no plausible pair of lungs: never a crop of the wrong region."""
    found = find_lungs(grey, cache_dir)
    if found.reason:
        return grey, found.reason
    if mode == "crop":
        left, top, right, bottom = found.box
        grow_x, grow_y = round(LUNG_CROP_MARGIN * (right - left)), round(LUNG_CROP_MARGIN * (bottom - top))
        height, width = grey.shape
        return grey[
            max(top - grow_y, 0) : min(bottom + grow_y, height), max(left - grow_x, 0) : min(right + grow_x, width)
        ], None
    side = max(grey.shape)
    mask = Image.fromarray(found.mask.astype(np.uint8) * 255)
    grow = 2 * round(LUNG_MASK_GROW * side) + 1
    mask = mask.filter(ImageFilter.MaxFilter(grow)).filter(ImageFilter.GaussianBlur(LUNG_MASK_SOFTEN * side))
    weight = np.asarray(mask, dtype=np.float32) / 255.0
    blended = grey.astype(np.float32) * weight + LUNG_MASK_FILL * (1.0 - weight)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8), None


def normalise_intensity(grey: np.ndarray, method: str) -> np.ndarray:
    """Grey-level normalisation of a uint8 image; ``method`` is one of ``INTENSITY_METHODS``."""
    if method == "none":
        return grey
    if method == "equalize":
        return np.asarray(ImageOps.equalize(Image.fromarray(grey, mode="L")), dtype=np.uint8)
    if method == "clahe":
        from skimage.exposure import equalize_adapthist  # imported here: only this step needs scikit-image

        if grey.min() == grey.max():  # nothing to equalise (and skimage would divide by zero)
            return grey.copy()
        return _to_uint8(equalize_adapthist(grey, clip_limit=CLAHE_CLIP_LIMIT, nbins=256) * 255.0)
    if method == "zscore":
        # From the histogram, and applied as a lookup table: a uint8 image has only 256 grey levels.
        image = Image.fromarray(grey, mode="L")
        counts = np.asarray(image.histogram(), dtype=np.float64)
        levels = np.arange(256, dtype=np.float64)
        mean = float(counts @ levels) / grey.size
        std = float(np.sqrt(counts @ (levels - mean) ** 2 / grey.size))
        if std < 1e-6:  # a constant image has no contrast to normalise: mid-grey
            return np.full_like(grey, 128)
        table = _to_uint8(128.0 + ZSCORE_SPREAD * (levels - mean) / std)
        return np.asarray(image.point(table.tolist()), dtype=np.uint8)
    raise CovidxrError(f"image pipeline: unknown intensity {method!r}; choose one of {', '.join(INTENSITY_METHODS)}")


def limit_resolution(grey: np.ndarray, longest_side: int) -> np.ndarray:
    """Downsample (anti-aliased) so the longest side is at most ``longest_side``; never upsample."""
    height, width = grey.shape
    if max(height, width) <= longest_side:
        return grey
    factor = longest_side / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    resized = Image.fromarray(grey, mode="L").resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(resized, dtype=np.uint8)


def _content_run(lines: np.ndarray) -> tuple[int, int] | None:
    """First and last index (exclusive end) of the rows of ``lines`` that hold image content."""
    values = lines.astype(np.float32)
    mid = ((lines > CROP_DARK_LEVEL) & (lines < CROP_BRIGHT_LEVEL)).mean(axis=1)
    content = (values.std(axis=1) >= CROP_MIN_STD) & (mid >= CROP_MIN_MID_FRACTION)
    content = _ndimage().binary_opening(content, structure=np.ones(min(CROP_MIN_RUN, len(content)), dtype=bool))
    index = np.flatnonzero(content)
    if index.size == 0:
        return None
    return int(index[0]), int(index[-1]) + 1


def content_box(grey: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the image content, without near-constant, black or white borders."""
    rows = _content_run(grey)
    if rows is None:
        return None
    cols = _content_run(grey[rows[0] : rows[1]].T)
    if cols is None:
        return None
    rows = _content_run(grey[:, cols[0] : cols[1]])  # again, now without the side frames
    if rows is None:
        return None
    return rows[0], rows[1], cols[0], cols[1]


def crop_thorax(grey: np.ndarray) -> np.ndarray:
    """The content bounding box, then its centred chest crop; the input itself when no box is found."""
    height, width = grey.shape
    box = content_box(grey)
    if box is None:
        return grey
    top, bottom, left, right = box
    box_h, box_w = bottom - top, right - left
    minimum = MIN_EFFECTIVE_RESOLUTION
    if box_h < max(minimum, CROP_MIN_BOX_FRACTION * height) or box_w < max(minimum, CROP_MIN_BOX_FRACTION * width):
        return grey
    keep_h, keep_w = round(box_h * CROP_HEIGHT_FRACTION), round(box_w * CROP_WIDTH_FRACTION)
    top += (box_h - keep_h) // 2
    left += (box_w - keep_w) // 2
    return grey[top : top + keep_h, left : left + keep_w].copy()


_SQUARE = np.ones((3, 3), dtype=bool)


def _windows(mask: np.ndarray, margin: int) -> list[tuple[slice, slice]]:
    """Windows covering the blobs of ``mask``: bounding boxes grown by ``margin`` pixels, overlapping
    ones merged (so the letters of a word, and the plate they sit on, share one window)."""
    height, width = mask.shape
    labels, _ = _ndimage().label(mask, structure=_SQUARE)
    boxes = [
        [
            max(0, rows.start - margin),
            min(height, rows.stop + margin),
            max(0, cols.start - margin),
            min(width, cols.stop + margin),
        ]
        for rows, cols in _ndimage().find_objects(labels)
    ]
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(len(boxes) - 1, i, -1):
                a, b = boxes[i], boxes[j]
                if a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]:
                    boxes[i] = [min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3])]
                    del boxes[j]
                    merged = True
    return [(slice(top, bottom), slice(left, right)) for top, bottom, left, right in boxes]


def _small_blobs(
    labels: np.ndarray, chosen: np.ndarray, shape: tuple[int, int], near_edge: bool, plate: bool = False
) -> np.ndarray:
    """Which labelled blobs (``chosen`` so far; index 0 = background) can be a glyph or marker (or,
    with ``plate``, the plate it is printed on): small enough for the image ``shape`` and, with
    ``near_edge``, centred within TEXT_EDGE_ZONE of an edge of the image."""
    height, width = shape
    if plate:
        max_area, short_side, long_side = TEXT_MAX_PLATE_FRACTION, TEXT_MAX_PLATE_SIDE, TEXT_MAX_PLATE_SIDE
    else:
        max_area, short_side, long_side = TEXT_MAX_BLOB_FRACTION, TEXT_MAX_BLOB_SIDE, TEXT_MAX_LINE_SIDE
    keep = chosen.copy()
    keep[0] = False
    keep &= np.bincount(labels.ravel(), minlength=len(keep)) <= max_area * height * width
    zone_h, zone_w = TEXT_EDGE_ZONE * height, TEXT_EDGE_ZONE * width
    for index, where in enumerate(_ndimage().find_objects(labels), start=1):
        if not keep[index] or where is None:
            keep[index] = False
            continue
        rows, cols = where
        extent = sorted(((rows.stop - rows.start) / height, (cols.stop - cols.start) / width))
        small = extent[0] <= short_side and extent[1] <= long_side
        cy, cx = (rows.start + rows.stop) / 2, (cols.start + cols.stop) / 2
        edge = cy < zone_h or cy > height - zone_h or cx < zone_w or cx > width - zone_w
        keep[index] = small and (edge or not near_edge)
    return keep


def _marker_region(glyphs: np.ndarray, grey: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Within one window: the glyphs plus the dark plate they are printed on, closed, with holes filled."""
    mask = glyphs.copy()
    # A dark plate or disc: a small near-black area touching the glyphs that does not reach the edge of
    # the window (the black background outside the body, or anything larger than the window, does).
    dark = grey <= TEXT_DARK_LEVEL
    touching = _ndimage().binary_dilation(mask, structure=_SQUARE, iterations=2) & dark
    if touching.any():
        labels, count = _ndimage().label(dark, structure=_SQUARE)
        chosen = np.zeros(count + 1, dtype=bool)
        chosen[labels[touching]] = True
        chosen[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = False
        mask |= _small_blobs(labels, chosen, shape, near_edge=False, plate=True)[labels]
    # Close small gaps (between letters, in thin rings), then take in the holes: the inside of "O",
    # "P", "R" and of circled markers; then a margin for anti-aliased and JPEG-smeared edges.
    mask = _ndimage().binary_fill_holes(_ndimage().binary_closing(mask, structure=_SQUARE, iterations=2))
    return _ndimage().binary_dilation(mask, structure=_SQUARE, iterations=TEXT_DILATION)


def text_mask(grey: np.ndarray) -> np.ndarray:
    """Boolean mask of burnt-in text and markers: small, bright, thin blobs that stand out from their
    neighbourhood, centred near an edge of the image, with their holes, the dark plate they may be
    printed on, and a small margin.

    "Thin" is measured by the white top-hat (the image minus its grey opening): strokes narrower
    than the opening vanish from it, while the bright body next to a dark background does not.
    """
    height, width = grey.shape
    size = max(3, round(TEXT_STROKE_FRACTION * max(height, width)))
    tophat = grey.astype(np.int16) - _ndimage().grey_opening(grey, size=(size, size)).astype(np.int16)
    candidates = (grey >= TEXT_MIN_LEVEL) & (tophat >= TEXT_MIN_CONTRAST)
    if not candidates.any():
        return candidates
    candidates = _ndimage().binary_closing(candidates, structure=_SQUARE)  # bridge 1-pixel gaps in thin strokes
    labels, count = _ndimage().label(candidates, structure=_SQUARE)
    seeded = np.zeros(count + 1, dtype=bool)
    seeded[labels[candidates & (grey >= TEXT_SEED_LEVEL)]] = True
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    contrast = np.bincount(labels.ravel(), weights=tophat.ravel(), minlength=count + 1) / np.maximum(sizes, 1)
    chosen = seeded & (contrast >= TEXT_MIN_BLOB_CONTRAST)
    glyphs = _small_blobs(labels, chosen, grey.shape, near_edge=True)[labels]
    mask = np.zeros_like(glyphs)
    # The rest works in small windows around the glyphs: cheap, and a plate must fit in its window.
    for window in _windows(glyphs, margin=max(8, round(TEXT_STROKE_FRACTION * max(height, width)))):
        mask[window] |= _marker_region(glyphs[window], grey[window], grey.shape)
    return mask


def mask_text(grey: np.ndarray) -> np.ndarray:
    """Replace burnt-in text and markers by their surroundings; fill a thin border band with the median.

    Each masked pixel takes the value of the nearest pixel a few pixels outside the mask, and the
    filled area is then smoothed, so blobs are inpainted from their surroundings. Pixels outside the
    masks and the border band are left exactly as they were.
    """
    height, width = grey.shape
    out = grey.copy()
    mask = text_mask(grey)
    for window in _windows(mask, margin=8):
        inside = mask[window]
        if inside.all():
            out[window] = np.uint8(np.median(grey))
            continue
        # Sample a few pixels away from the mask, past dark outlines and JPEG ringing around markers.
        sampled = _ndimage().binary_dilation(inside, structure=_SQUARE, iterations=TEXT_SAMPLE_GAP)
        if sampled.all():
            sampled = inside
        nearest = _ndimage().distance_transform_edt(sampled, return_distances=False, return_indices=True)
        filled = _ndimage().gaussian_filter(grey[window][nearest[0], nearest[1]].astype(np.float32), 2.0, truncate=3.0)
        out[window][inside] = _to_uint8(filled[inside])
    band_h, band_w = round(BORDER_FRACTION * height), round(BORDER_FRACTION * width)
    if band_h or band_w:
        inner = out[band_h : height - band_h or None, band_w : width - band_w or None]
        median = np.uint8(np.median(inner if inner.size else out))
        if band_h:
            out[:band_h] = median
            out[height - band_h :] = median
        if band_w:
            out[:, :band_w] = median
            out[:, width - band_w :] = median
    return out


# ---------------------------------------------------------------------------------------------
# Random acquisition augmentation (training only)
# ---------------------------------------------------------------------------------------------


# name -> (smallest, largest, whether the largest value is allowed)
@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image in [0, 1] becomes the network's input: ``(x * scale)[channels] - mean) / std``."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float = 1.0
    bgr: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """As ``to_dict`` wrote it (an exported graph's sidecar stores it so): lists become tuples."""
        options = _check_keys("normalisation", cls, data)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})


PREPROCESSING = {
    # torchvision / timm ImageNet statistics
    "imagenet": Preprocessing("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Keras "caffe" mode (VGG-16, ResNet-50 from Keras): BGR, 0-255, mean subtraction, no scaling
    "caffe": Preprocessing("caffe", (103.939, 116.779, 123.68), (1.0, 1.0, 1.0), scale=255.0, bgr=True),
    # Keras "tf" / Inception mode (Xception): scale to [-1, 1]
    "inception": Preprocessing("inception", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # TensorFlow EfficientNet-Lite: (x - 127) / 128 on 0-255 pixels
    "efficientnet_lite": Preprocessing("efficientnet_lite", (127.0,) * 3, (128.0,) * 3, scale=255.0),
}


def to_input_array(image: Image.Image, size: int, preprocessing: Preprocessing) -> np.ndarray:
    """An RGB (or grey, mode ``L``) PIL image → a normalised CHW float32 array of ``size`` x ``size``.

    The image is resized to a square without keeping its aspect ratio, as Keras'
    ``target_size`` did in the paper.
    """
    mean, std = np.asarray(preprocessing.mean, np.float32), np.asarray(preprocessing.std, np.float32)
    if image.mode == "L":  # grey: resize one band and broadcast it (the same numbers as three equal bands)
        band = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
        band = band / 255.0 * preprocessing.scale
        return (band[None] - mean[:, None, None]) / std[:, None, None]
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(resized, dtype=np.float32) / 255.0 * preprocessing.scale
    if preprocessing.bgr:
        array = array[..., ::-1]
    array = (array - mean) / std
    return np.ascontiguousarray(array.transpose(2, 0, 1))


@dataclass(frozen=True)
class InputTransform:
    """Everything between a decoded image and the network: the shortcut-resistant pipeline, the resize
    and the backbone's normalisation. Small and immutable, so decoding threads share it."""

    image_size: int
    preprocessing: Preprocessing
    pipeline: ImagePipeline = ImagePipeline()

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.with_reason(image)[0]

    @property
    def decode_side(self) -> int | None:
        """The fewest pixels a side of a decoded image should keep for this input, or None where the pipeline
        needs the full resolution (text masking finds glyphs at full size). Twice the input size, so the
        resize still averages several pixels into each (the numbers barely move), and twice that again for
        a lung or thorax crop, which keeps about half of the image."""
        if self.pipeline.mask_text:
            return None
        cropped = self.pipeline.lungs == "crop" or self.pipeline.crop_thorax
        return max(self.image_size * (4 if cropped else 2), self.pipeline.effective_resolution)

    def with_reason(self, image: Image.Image, grey: np.ndarray | None = None) -> tuple[np.ndarray, str | None]:
        """The input array (CHW float32), and why the image is out of distribution for the pipeline (its lungs were
        not found, for lung-only input), else None. ``grey``: the image's ``luma``, where already made."""
        processed = self.pipeline.process(image, grey)
        reason = processed.info.get(LUNGS_REASON)
        return to_input_array(processed, self.image_size, self.preprocessing), reason
