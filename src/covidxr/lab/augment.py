"""Training-only augmentation: randomised acquisition looks (contrast, blur, noise, JPEG, small rotations,
zoom and flips) so a head cannot learn one collection's scanner or export settings."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from numbers import Real
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from covidxr.runtime.preprocess import _check_keys, _error, _ndimage, _to_uint8

__all__ = ["AcquisitionAugment"]

_AUGMENT_RANGES: dict[str, tuple[float, float, bool]] = {
    "contrast": (0.0, 1.0, False),
    "gamma": (0.0, 3.0, True),
    "blur_sigma": (0.0, 10.0, True),
    "noise": (0.0, 0.5, True),
    "rotation": (0.0, 45.0, True),
    "scale": (0.0, 0.5, True),
}


@dataclass(frozen=True)
class AcquisitionAugment:
    """Random acquisition-look changes for training only: contrast, gamma, blur, noise, JPEG
    re-encoding, small rotations and scaling. No left-right flip unless asked (anatomy is not
    mirror-symmetric).

    ``contrast``: factor in [1-c, 1+c] around the mean. ``gamma``: log-uniform in [1/(1+g), 1+g].
    ``blur_sigma``: Gaussian sigma in [0, blur_sigma], with probability 0.5. ``noise``: Gaussian noise
    std in [0, noise] x 255. ``jpeg_quality``: re-encode with a quality drawn in this range, with
    probability 0.5; quality 100 means no re-encoding, so (100, 100) turns it off. ``rotation``:
    degrees in [-r, r]. ``scale``: zoom in [1-s, 1+s], image size kept (cropped, or padded with the
    image median). ``hflip``: mirror with probability 0.5. A zero (or (100, 100)) turns a component
    off; with all of them off the output has the input's exact pixels.
    """

    contrast: float = 0.25
    gamma: float = 0.25
    blur_sigma: float = 1.5
    noise: float = 0.03
    jpeg_quality: tuple[int, int] = (30, 95)
    rotation: float = 7.0
    scale: float = 0.10
    hflip: bool = False

    def __post_init__(self) -> None:
        owner = "augmentation"
        for name, (low, high, high_ok) in _AUGMENT_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                raise _error(owner, f"{name} must be a number, not {value!r}")
            if value < low or value > high or (value == high and not high_ok):
                bracket = "]" if high_ok else ")"
                raise _error(owner, f"{name} must be in [{low:g}, {high:g}{bracket}, not {value!r}")
            object.__setattr__(self, name, float(value))
        quality = self.jpeg_quality
        if (
            not isinstance(quality, (tuple, list))
            or len(quality) != 2
            or not all(isinstance(q, (int, np.integer)) and not isinstance(q, bool) for q in quality)
            or not 1 <= quality[0] <= quality[1] <= 100
        ):
            raise _error(owner, f"jpeg_quality must be two whole numbers 1 <= low <= high <= 100, not {quality!r}")
        object.__setattr__(self, "jpeg_quality", (int(quality[0]), int(quality[1])))
        if not isinstance(self.hflip, (bool, np.bool_)):
            raise _error(owner, f"hflip must be true or false, not {self.hflip!r}")
        object.__setattr__(self, "hflip", bool(self.hflip))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able options (``jpeg_quality`` as a two-item list)."""
        data = asdict(self)
        data["jpeg_quality"] = list(self.jpeg_quality)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> AcquisitionAugment:
        """Options from ``to_dict`` (or a config file); ``None`` or ``{}`` gives the defaults."""
        return cls(**_check_keys("augmentation", cls, data))

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """One random variant of ``image`` (same size and mode), fully determined by ``rng``'s state.

        Order: positioning (flip, rotation, zoom), detector response (contrast, gamma), sharpness
        (blur), quantum noise, then archive compression (JPEG), as in an acquisition chain.
        """
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, not {type(rng).__name__}")
        # Every scalar is drawn every time, so the stream of draws does not depend on the options.
        flip = rng.random() < 0.5 and self.hflip
        angle = rng.uniform(-self.rotation, self.rotation)
        zoom = rng.uniform(1.0 - self.scale, 1.0 + self.scale)
        contrast = rng.uniform(1.0 - self.contrast, 1.0 + self.contrast)
        log_gamma = math.log1p(self.gamma)
        gamma = math.exp(rng.uniform(-log_gamma, log_gamma))
        blur = rng.random() < 0.5
        sigma = rng.uniform(0.0, self.blur_sigma)
        noise_std = rng.uniform(0.0, self.noise) * 255.0
        jpeg = rng.random() < 0.5
        quality = int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1))

        grey = image if image.mode == "L" else image.convert("L")
        changed = False
        if flip:
            grey, changed = ImageOps.mirror(grey), True
        if angle != 0.0 or zoom != 1.0:
            grey, changed = _rotate_zoom(grey, angle, zoom), True
        values = np.asarray(grey, dtype=np.float32)
        if contrast != 1.0:
            mean = values.mean()
            values = mean + contrast * (values - mean)
            changed = True
        if gamma != 1.0:
            values = 255.0 * (np.clip(values, 0.0, 255.0) / 255.0) ** gamma
            changed = True
        if blur and sigma > 0.0:
            values = _ndimage().gaussian_filter(values, sigma, mode="nearest", truncate=3.0)
            changed = True
        if noise_std > 0.0:
            values = values + noise_std * rng.standard_normal(values.shape, dtype=np.float32)
            changed = True
        reencode = jpeg and quality < 100
        if not changed and not reencode:
            return image.copy()
        out = Image.fromarray(_to_uint8(values), mode="L")
        if reencode:
            buffer = io.BytesIO()
            out.save(buffer, format="JPEG", quality=quality)
            buffer.seek(0)
            with Image.open(buffer) as decoded:
                out = decoded.convert("L")
        return out if image.mode == "L" else out.convert(image.mode)


def _rotate_zoom(grey: Image.Image, angle: float, zoom: float) -> Image.Image:
    """Rotate by ``angle`` degrees and zoom by ``zoom`` about the centre, keeping the size; uncovered
    corners get the image median."""
    width, height = grey.size
    cx, cy = width / 2.0, height / 2.0
    theta = math.radians(angle)
    cos, sin = math.cos(theta) / zoom, math.sin(theta) / zoom
    # PIL maps each output pixel (x, y) to the input pixel (a x + b y + c, d x + e y + f).
    matrix = (cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)
    fill = int(np.median(np.asarray(grey)))
    return grey.transform(grey.size, Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR, fillcolor=fill)


# ---------------------------------------------------------------------------------------------
# The network's input: resize and normalisation
# ---------------------------------------------------------------------------------------------
