"""Grad-CAM without torch, from an exported graph's activations (runtime layer: numpy and Pillow).

For a backbone whose Grad-CAM layer reaches the pooled features through an elementwise step
(EfficientNet-Lite: ``_bn1`` → ReLU6 → global average pooling) and the dense head
(Dense → ReLU → Dropout → Dense, or one Dense), the gradient of a class logit with respect to that
layer's activations ``A`` is analytic:

    d logit_c / d A[k, i, j] = g_c[k] · act'(A[k, i, j]) / (h · w),   g_c = W1ᵀ (W2[c] ⊙ 1[W1 f + b1 > 0])

so the Grad-CAM channel weights are ``mean_ij`` of it, and the map is ``ReLU(Σ_k weight_k · A_k)``,
scaled to [0, 1] and resized to the input exactly as pytorch-grad-cam does (``scale_cam_image``:
min-max, OpenCV's bilinear resize, then min-max again). ``tests/test_cam.py`` checks it against
pytorch-grad-cam's ``GradCAM`` on real images. Other methods, staged heads and backbones without such
a step keep using torch (``covidxr.lab.explain``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import load_file

from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.lungs import find_lungs
from covidxr.runtime.preprocess import ImagePipeline

__all__ = [
    "COLOUR_PHOTOGRAPH",
    "COLOUR_SPREAD_LIMIT",
    "EMPTY_MAP",
    "SHEET_SIZE",
    "contact_sheets",
    "contact_thumbnail",
    "DenseHead",
    "colour_reason",
    "colour_spread",
    "empty_map",
    "gradcam",
    "jet",
    "lung_shares",
    "lungs_on_input",
    "overlay",
    "resize_bilinear",
]

_DERIVATIVES = {
    "relu6": lambda a: ((a > 0) & (a < 6)).astype(np.float64),
    "relu": lambda a: (a > 0).astype(np.float64),
    "identity": lambda a: np.ones_like(a, dtype=np.float64),
}
_ACTIVATIONS = {
    "relu6": lambda a: np.clip(a, 0, 6),
    "relu": lambda a: np.maximum(a, 0),
    "identity": lambda a: a,
}


class DenseHead:
    """The trained head read from its safetensors with numpy: ``0.*`` and ``3.*`` (Dense → ReLU → Dropout
    → Dense) or ``1.*`` (Dropout → Dense)."""

    def __init__(self, path: str | Path):
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises several types for damaged files
            raise CovidxrError(f"{path}: damaged head weights ({type(exc).__name__})") from None
        if {"0.weight", "0.bias", "3.weight", "3.bias"} <= state.keys():
            self.layers = [(state["0.weight"], state["0.bias"]), (state["3.weight"], state["3.bias"])]
        elif {"1.weight", "1.bias"} == state.keys():
            self.layers = [(state["1.weight"], state["1.bias"])]
        else:
            raise CovidxrError(f"{path}: not a dense head (keys {sorted(state)}); Grad-CAM needs torch here")
        self.layers = [(w.astype(np.float64), b.astype(np.float64)) for w, b in self.layers]

    def logit_gradients(self, features: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """d logit[class] / d features for each row (``[batch, features]``)."""
        features = np.asarray(features, dtype=np.float64)
        if len(self.layers) == 1:
            return self.layers[0][0][classes]
        (w1, b1), (w2, _) = self.layers
        active = (features @ w1.T + b1) > 0
        return (w2[classes] * active) @ w1


def resize_bilinear(maps: np.ndarray, width: int, height: int) -> np.ndarray:
    """OpenCV's ``cv2.resize(..., INTER_LINEAR)`` of float maps ``[batch, h, w]``: half-pixel centres,
    coordinates clamped at the borders."""

    def axis(source: int, target: int) -> tuple[np.ndarray, np.ndarray]:
        position = (np.arange(target) + 0.5) * (source / target) - 0.5
        start = np.floor(position).astype(int)
        fraction = position - start
        low, high = start < 0, start >= source - 1
        fraction[low | high] = 0.0
        start = np.clip(start, 0, source - 1)
        return start, fraction

    _, h, w = maps.shape
    x0, fx = axis(w, width)
    y0, fy = axis(h, height)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    rows = maps[:, y0, :] * (1 - fy)[None, :, None] + maps[:, y1, :] * fy[None, :, None]
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx


def _scale(maps: np.ndarray) -> np.ndarray:
    maps = maps - maps.min(axis=(1, 2), keepdims=True)
    return maps / (1e-7 + maps.max(axis=(1, 2), keepdims=True))


def gradcam(activations: np.ndarray, head: DenseHead, classes: np.ndarray, activation: str, size: int) -> np.ndarray:
    """Grad-CAM maps ``[batch, size, size]`` in [0, 1] of ``classes`` from the Grad-CAM layer's ``activations``
    ``[batch, channels, h, w]``; ``activation`` is the elementwise step between that layer and the pooling."""
    if activation not in _DERIVATIVES:
        raise CovidxrError(f"no analytic Grad-CAM through {activation!r}; it needs torch")
    a = np.asarray(activations, dtype=np.float64)
    pooled = _ACTIVATIONS[activation](a).mean(axis=(2, 3))
    g = head.logit_gradients(pooled, np.asarray(classes, dtype=int))
    _, _, h, w = a.shape
    weights = g * _DERIVATIVES[activation](a).mean(axis=(2, 3)) / (h * w)  # the gradients' spatial mean
    cam = np.maximum(np.einsum("bk,bkij->bij", weights, a), 0).astype(np.float32)
    scaled = resize_bilinear(_scale(cam), size, size).astype(np.float32)
    return _scale(np.maximum(scaled, 0)).astype(np.float32)


def jet(values: np.ndarray) -> np.ndarray:
    """The 'jet' colour map of values in [0, 1] as RGB floats in [0, 1]."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    return np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)


def overlay(image: Image.Image, cam: np.ndarray, size: int | None = None, image_weight: float = 0.55) -> Image.Image:
    """The map, upsampled to the image (or to ``size`` square), drawn over it in jet colours."""
    rgb = image.convert("RGB")
    if size:
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    upsampled = np.asarray(
        Image.fromarray(np.float32(cam)).resize(rgb.size, Image.Resampling.BILINEAR), dtype=np.float32
    )
    base = np.asarray(rgb, dtype=np.float32) / 255.0
    blended = (1 - image_weight) * jet(upsampled) + image_weight * base
    return Image.fromarray(np.uint8(255 * blended / blended.max()))


COLOUR_SPREAD_LIMIT = 20.0  # mean per-pixel channel spread (0-255) above which an image is a colour photo
COLOUR_PHOTOGRAPH = "a colour photograph, not a grey chest X-ray"
GREY_MODES = frozenset({"1", "L", "I", "I;16", "F"})  # single-channel images: no colour to measure
EMPTY_MAP = "no class-specific activation (the map is all zero)"


def lungs_on_input(
    size: int, pipeline: ImagePipeline, image: Image.Image, hand_mask: np.ndarray | None = None
) -> np.ndarray | None:
    """The lungs of ``image`` on a model's ``size`` square input grid (bool), or None where none are found:
    the hand-drawn ``hand_mask`` (the image's pixel size; 255 = lung) where one exists and the ``pipeline``
    keeps the image's geometry, else the bundled segmenter on the image the model sees."""
    if hand_mask is not None and not pipeline.crop_thorax and pipeline.lungs != "crop":
        scaled = Image.fromarray((hand_mask == 255).astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
        return np.asarray(scaled) >= 128
    found = find_lungs(np.asarray(pipeline.process(image).convert("L")))
    if found.reason:
        return None
    scaled = Image.fromarray(found.mask.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
    return np.asarray(scaled) >= 128


def lung_shares(maps: np.ndarray, lungs: Sequence[np.ndarray | None]) -> np.ndarray:
    """Share of each map's mass inside its image's lungs (NaN where the lungs are unknown, or the map is empty:
    an all-zero map has no mass to share, and must not count as 0% inside)."""
    shares = np.full(len(maps), np.nan)
    for i, (cam, mask) in enumerate(zip(maps, lungs, strict=True)):
        if mask is not None and not empty_map(cam):
            shares[i] = float(cam[mask].sum() / (cam.sum() + 1e-12))
    return shares


SHEET_SIZE = 48  # overlays per contact sheet (8 x 6): a folder of any size stays a few readable pages
THUMBNAIL_SIDE = 192


def contact_thumbnail(image: Image.Image) -> Image.Image:
    """An overlay shrunk for a contact sheet (kept instead of the full overlay, so memory stays small)."""
    thumbnail = image.convert("RGB")
    thumbnail.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    return thumbnail


def contact_sheets(entries: Sequence[tuple[str, str, Image.Image]], columns: int = 8) -> list[Image.Image]:
    """Sheets of ``(file name, answer, thumbnail)``, each thumbnail over its name and answer, ``SHEET_SIZE`` a
    sheet, in the order given: ``explain DIR`` at a glance."""
    from PIL import ImageDraw

    caption, cell = 28, THUMBNAIL_SIDE + 8
    sheets = []
    for start in range(0, len(entries), SHEET_SIZE):
        page = entries[start : start + SHEET_SIZE]
        rows = -(-len(page) // columns)
        sheet = Image.new("RGB", (min(columns, len(page)) * cell, rows * (cell + caption)), "white")
        draw = ImageDraw.Draw(sheet)
        for i, (name, answer, thumbnail) in enumerate(page):
            left, top = (i % columns) * cell, (i // columns) * (cell + caption)
            sheet.paste(thumbnail, (left + (cell - thumbnail.width) // 2, top + (cell - thumbnail.height) // 2))
            short = name if len(name) <= 30 else name[:14] + "…" + name[-15:]
            draw.text((left + 4, top + cell), short, fill="black")
            draw.text((left + 4, top + cell + 13), answer, fill="black")
        sheets.append(sheet)
    return sheets


def colour_spread(image: Image.Image) -> float:
    """Mean per-pixel spread between the RGB channels (0 for a grey X-ray, tens for a colour photo)."""
    if image.mode in GREY_MODES:
        return 0.0
    # Sampled before converting (nearest pixels, no full-size copy): it runs on every image predict answers.
    small = image.resize((128, 128), Image.Resampling.NEAREST)
    array = np.asarray(small if small.mode == "RGB" else small.convert("RGB"), dtype=np.int16)
    red, green, blue = array[..., 0], array[..., 1], array[..., 2]  # numpy reduces a 3-wide last axis slowly
    return float((np.maximum(np.maximum(red, green), blue) - np.minimum(np.minimum(red, green), blue)).mean())


def colour_reason(image: Image.Image) -> str | None:
    """Why a colour photograph gets no answer and no map, in the one wording ``predict``, ``explain``, the API
    and the page all use (None for a grey image): its lungs are never looked for, as it is not an X-ray."""
    spread = colour_spread(image)
    if spread <= COLOUR_SPREAD_LIMIT:
        return None
    return f"{COLOUR_PHOTOGRAPH} (channel spread {spread:.0f}/255)"


def empty_map(cam: np.ndarray) -> bool:
    """Whether a class activation map is all zero: no class-specific activation to show or to measure."""
    return not bool(np.any(np.asarray(cam) > 0))
