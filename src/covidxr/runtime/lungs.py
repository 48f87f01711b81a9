"""Lung fields of a chest X-ray: the bundled segmenter at run time (numpy, PIL and onnxruntime only).

``lung_segmenter().segment(grey)`` runs the small U-Net that ships as ``bundled/lungs.onnx`` on a
greyscale image of any size and returns ``LungFields``: the mask at the image's size, the two lungs'
bounding box and their share of the image, or the reason no plausible pair of lungs was found (a
photograph, a lateral view, an abdomen, a blank image). The graph is trained by
``covidxr.lab.lungs_train`` (torch); its sidecar ``bundled/lungs.json`` holds the input size, the
normalisation, the threshold, the SHA-256 of the graph and the training figures.

Post-processing at the model's resolution, in order: the probability rounded to 8 bits (what the
cache stores); threshold it; label the 4-connected components; keep the (at most) two largest
components of at least ``MIN_LUNG_FRACTION`` of the image; fill their holes. Then the rules below
give the reason, if any.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from covidxr.runtime.bundle import BUNDLED
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.plugins import entry_point
from covidxr.runtime.storage import atomic_write

__all__ = [
    "GRAPH",
    "LungFields",
    "LungSegmenter",
    "SIDECAR",
    "fill_holes",
    "label_components",
    "lung_reason",
    "find_lungs",
    "find_orientation",
    "lung_segmenter",
    "model_input",
    "normalise",
    "overlay",
]

GRAPH = BUNDLED / "lungs.onnx"
SIDECAR = BUNDLED / "lungs.json"

# Rules for "two plausible lungs", all at the model's resolution. Lungs in the 1,018 hand masks cover
# 17-53% of their image (both lungs together); each lung is well over 2% of it.
MIN_LUNG_FRACTION = 0.02  # a component smaller than this share of the image is noise, not a lung
AREA_RANGE = (0.08, 0.70)  # both lungs together: outside this share of the image is implausible
MAX_OVERLAP = 0.5  # two lungs stand side by side: their column ranges overlap by at most this share of the narrower
# Confidence: on photographs, rotated or cropped images the network hesitates. Over all 1,018 masked images
# and all 810 NIH images these two rules flag 1 adult, no child and 10 NIH images (see docs/user-guide.md).
MIN_MEAN_PROBABILITY = 0.92  # mean lung probability over the kept lungs
MAX_UNCERTAIN_SHARE = 0.30  # pixels of probability 0.25-0.75, as a share of the pixels called lung
# Orientation: the segmenter, trained on upright films, is more confident on an image turned the right way up.
# An image is called upside down (or sideways) when a turned view beats it by more than this margin of
# confidence (mean lung probability minus the uncertain share); benchmarks/orientation.py measures the rates.
ORIENTATION_MARGIN = 0.02
# An image whose lungs the segmenter finds at least this surely as given is upright, and its turned views are not
# segmented: of 800 shared films turned 180° or flipped, none scored over 0.82 as given, and 59% of them upright
# scored 0.85 or more; the check's detections and refusals on them are unchanged (benchmarks/orientation.py).
UPRIGHT_CONFIDENCE = 0.85
# The views compared with the image as given, and how a user should read each one.
TURNS = {
    "turned 180°": lambda small: small[::-1, ::-1],
    "flipped top to bottom": lambda small: small[::-1],
    "turned 90° clockwise": lambda small: np.rot90(small, -1),
    "turned 90° anticlockwise": lambda small: np.rot90(small, 1),
}
# Upright views' confidence kept for the orientation check, which follows the lung crop on the same model input:
# a few per decoding thread is plenty, and an image not found is only segmented again.
MEMO_SIZE = 64


@dataclass(frozen=True)
class LungFields:
    """What the segmenter found in one image.

    ``mask``: bool, the image's height x width, the lungs kept (also when ``reason`` is set, to show what
    was found). ``box``: ``(left, top, right, bottom)`` of the two lungs in image pixels (right/bottom
    exclusive); None whenever ``reason`` is set, so nothing crops a region that is not two lungs.
    ``area_fraction``: the kept mask's share of the image. ``reason``: None for two plausible lungs, else
    one short sentence saying why the image is out of distribution for lung-based preprocessing.
    """

    mask: np.ndarray
    box: tuple[int, int, int, int] | None
    area_fraction: float
    reason: str | None


def model_input(grey: np.ndarray, size: int) -> np.ndarray:
    """The image resized to ``size`` x ``size`` (PIL bilinear, antialiased; aspect not kept), uint8.

    Training and prediction both go through here, so the graph sees the same pixels in both."""
    grey = np.asarray(grey)
    if grey.dtype != np.uint8 or grey.ndim != 2:
        raise CovidxrError(f"the lung segmenter takes a uint8 HxW grey image, not {grey.dtype} {grey.shape}")
    return np.asarray(Image.fromarray(grey).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def normalise(small: np.ndarray) -> np.ndarray:
    """Per-image z-score (standard deviation floored at 1 grey level, so a blank image stays finite), float32."""
    values = small.astype(np.float32)
    return (values - values.mean()) / max(float(values.std()), 1.0)


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The horizontal runs of True pixels, row by row: their rows, first columns and ends (exclusive)."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    rows, cols = np.nonzero(np.diff(padded, axis=1))  # each run gives a rise then a fall, in row order
    return rows[::2], cols[::2], cols[1::2]


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a bool mask (labels 1..n, 0 = background, numbered in reading order), by
    union-find over row runs: a few hundred runs at the model's resolution, so the loop stays short; the
    runs are read and painted back with numpy."""
    run_rows, run_starts, run_ends = _runs(mask)
    rows, starts, ends = run_rows.tolist(), run_starts.tolist(), run_ends.tolist()
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    previous: list[int] = []  # indices of the runs on the row above
    current: list[int] = []
    row = -1
    for index, r in enumerate(rows):
        if r != row:
            previous = current if r == row + 1 else []
            current, row = [], r
        start, end = starts[index], ends[index]
        for other in previous:
            if starts[other] < end and start < ends[other]:
                parent[root(index)] = root(other)
        current.append(index)
    names: dict[int, int] = {}
    run_labels = np.array([names.setdefault(root(i), len(names) + 1) for i in range(len(rows))], dtype=np.int32)
    lengths = run_ends - run_starts
    offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    labels = np.zeros(mask.shape, dtype=np.int32)
    labels.flat[np.repeat(run_rows * mask.shape[1] + run_starts, lengths) + offsets] = np.repeat(run_labels, lengths)
    return labels, len(names)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every background region that does not touch the border filled.

    Only the mask's bounding box is labelled, inside a one-pixel background ring: everything outside the box is
    background that reaches the border in a straight line, so a region inside it is a hole exactly when it does
    not reach the ring (the ring is one region, the one in its corner)."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    filled = mask.copy()
    if not len(rows):
        return filled
    inside = filled[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]  # a view: filling it fills ``filled``
    labels, _ = label_components(np.pad(~inside, 1, constant_values=True))
    inside |= (labels[1:-1, 1:-1] != 0) & (labels[1:-1, 1:-1] != labels[0, 0])
    return filled


def keep_lungs(mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The two largest components of at least ``MIN_LUNG_FRACTION`` of the image together, holes filled,
    and each of them as found (largest first)."""
    labels, count = label_components(mask)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    order = [int(i) + 1 for i in np.argsort(-areas, kind="stable") if areas[i] >= MIN_LUNG_FRACTION * mask.size]
    lungs = [labels == name for name in order[:2]]
    wanted = np.zeros(count + 1, dtype=bool)
    wanted[order[:2]] = True  # a lookup by label: what ``np.isin`` gives, without its sort
    return fill_holes(wanted[labels]), lungs


def lung_reason(lungs: list[np.ndarray], area_fraction: float, probability: np.ndarray, threshold: float) -> str | None:
    """Why the kept components are not two plausible lungs (None when they are)."""
    if not lungs:
        return "no lungs found"
    if len(lungs) == 1:
        return "only one lung found"
    columns = [np.nonzero(lung.any(axis=0))[0] for lung in lungs]
    overlap = min(columns[0][-1], columns[1][-1]) - max(columns[0][0], columns[1][0]) + 1
    if overlap > MAX_OVERLAP * min(len(columns[0]), len(columns[1])):
        return "two lung-like regions found, but not side by side"
    low, high = AREA_RANGE
    if not low <= area_fraction <= high:
        return f"lung area implausible ({area_fraction:.0%} of the image)"
    mean_probability = float(probability[lungs[0] | lungs[1]].mean())
    uncertain = ((probability > 0.25) & (probability < 0.75)).sum() / max(1, (probability >= threshold).sum())
    if mean_probability < MIN_MEAN_PROBABILITY or uncertain > MAX_UNCERTAIN_SHARE:
        return (
            f"lungs found with low confidence (mean probability {mean_probability:.2f}, "
            f"{uncertain:.0%} of the lung area uncertain)"
        )
    return None


def _box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if not len(rows):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def overlay(grey: np.ndarray, fields: LungFields) -> Image.Image:
    """The image in grey with the mask tinted (green for two plausible lungs, red otherwise) and the box."""
    rgb = np.repeat(np.asarray(grey, dtype=np.float32)[..., None], 3, axis=2)
    tint = np.array([255.0, 60.0, 60.0] if fields.reason else [60.0, 255.0, 90.0])
    rgb[fields.mask] = 0.6 * rgb[fields.mask] + 0.4 * tint
    image = Image.fromarray(rgb.astype(np.uint8))
    if fields.box is not None:
        left, top, right, bottom = fields.box
        width = max(1, round(max(image.size) / 256))
        ImageDraw.Draw(image).rectangle((left, top, right - 1, bottom - 1), outline=(255, 220, 0), width=width)
    return image


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_png_atomic(path: Path, grey: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())


class LungSegmenter:
    """The lung segmenter of one ONNX graph and its sidecar (default: the bundled ones).

    The graph's SHA-256 must match the sidecar's. onnxruntime runs on ``threads`` intra-op threads
    (default 1: the segmenter runs inside the decoding threads, one per core) without spinning.
    """

    def __init__(self, graph: str | Path = GRAPH, sidecar: str | Path | None = None, threads: int = 1):
        self.graph = Path(graph)
        self._memo: OrderedDict[bytes, float] = OrderedDict()
        self._inputs: OrderedDict[int, tuple[weakref.ref, np.ndarray]] = OrderedDict()
        self._memo_lock = threading.Lock()
        sidecar = Path(sidecar) if sidecar is not None else self.graph.with_suffix(".json")
        try:
            self.info = json.loads(sidecar.read_text())
            self.size, self.threshold = int(self.info["input_size"]), float(self.info["threshold"])
            expected = self.info["sha256"]
        except (OSError, ValueError, KeyError) as exc:
            raise CovidxrError(
                f"{sidecar}: not a usable lung segmenter sidecar ({type(exc).__name__}: {exc})"
            ) from None
        if not self.graph.is_file():
            raise CovidxrError(f"{self.graph}: lung segmenter graph not found")
        self.sha256 = _sha256(self.graph)
        if self.sha256 != expected:
            raise CovidxrError(
                f"{self.graph}: SHA-256 {self.sha256[:16]}… does not match {sidecar.name} ({expected[:16]}…); "
                "reinstall covidxr or rebuild the segmenter with scripts/train_segmenter.sh"
            )
        self.torch_logits = None
        try:
            import onnxruntime
        except ImportError:  # as the classifier's ``auto`` engine does: torch where onnxruntime is missing
            self.session, self.torch_logits = None, _torch_segmenter(self.graph.with_suffix(".safetensors"))
            return
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(str(self.graph), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def _model_input(self, grey: np.ndarray) -> np.ndarray:
        """``model_input`` of ``grey``, made once per read-only array (the lung crop and the orientation check resize
        the same decoded film: 9 ms each for a 3000 x 2500 DICOM). Kept by the array's identity while it lives (a
        weak reference: a freed array's id, reused, never finds its entry); a writeable array could change in
        between, so it is always resized."""
        if not isinstance(grey, np.ndarray) or grey.flags.writeable:
            return model_input(grey, self.size)
        with self._memo_lock:
            kept = self._inputs.get(id(grey))
        if kept is not None and kept[0]() is grey:
            return kept[1]
        small = model_input(grey, self.size)
        small.flags.writeable = False  # shared by its callers
        with self._memo_lock:
            self._inputs[id(grey)] = (weakref.ref(grey), small)
            while len(self._inputs) > MEMO_SIZE:
                self._inputs.popitem(last=False)
        return small

    def _remember(self, small: np.ndarray, confidence: float) -> None:
        """Keep one model input's ``confidence`` for ``orientation`` (the last ``MEMO_SIZE``, any thread's)."""
        key = small.tobytes()
        with self._memo_lock:
            self._memo[key] = confidence
            self._memo.move_to_end(key)
            while len(self._memo) > MEMO_SIZE:
                self._memo.popitem(last=False)

    def _recall(self, small: np.ndarray) -> float | None:
        """The confidence kept for exactly these model-input bytes (taken out of the memo), or None."""
        with self._memo_lock:
            return self._memo.pop(small.tobytes(), None)

    def probabilities(self, smalls: list[np.ndarray]) -> np.ndarray:
        """Lung probability per pixel of model-resolution uint8 inputs, N x size x size, in 1/255 steps
        (uint8: 255 = 1), the form the cache stores."""
        batch = np.stack([normalise(small) for small in smalls])[:, None]
        if self.session is None:
            logits = self.torch_logits(batch)[:, 0]
        else:
            logits = self.session.run(None, {self.input_name: batch})[0][:, 0]
        return np.rint(255.0 / (1.0 + np.exp(-logits))).astype(np.uint8)

    def _cache_path(self, small: np.ndarray, cache_dir: Path) -> Path:
        key = hashlib.sha256(np.ascontiguousarray(small).tobytes()).hexdigest()
        return Path(cache_dir) / "lungs" / self.sha256[:16] / f"{key}.png"

    def segment(self, grey: np.ndarray, cache_dir: Path | None = None) -> LungFields:
        """The lungs of one uint8 HxW image; with ``cache_dir`` the model-resolution probability map (an 8-bit
        soft mask) is read from, or written to, ``cache_dir/lungs/<graph sha[:16]>/<sha256 of the model
        input>.png``; without it nothing is written."""
        [fields] = self.segment_batch([grey], cache_dir)
        return fields

    def segment_batch(self, greys: list[np.ndarray], cache_dir: Path | None = None) -> list[LungFields]:
        """``segment`` for several images, one onnxruntime call for those not in the cache."""
        smalls = [self._model_input(grey) for grey in greys]
        raw: list[np.ndarray | None] = [None] * len(smalls)
        paths = [self._cache_path(small, cache_dir) for small in smalls] if cache_dir is not None else []
        for i, path in enumerate(paths):
            if path.is_file():
                try:
                    with Image.open(path) as cached:
                        raw[i] = np.asarray(cached.convert("L"))
                except OSError:
                    raw[i] = None  # a damaged cache file: segment again and overwrite it
        todo = [i for i, soft in enumerate(raw) if soft is None or soft.shape != (self.size, self.size)]
        if todo:
            for i, probability in zip(todo, self.probabilities([smalls[i] for i in todo]), strict=True):
                raw[i] = probability
                if paths:
                    _write_png_atomic(paths[i], probability)
        found = [self._fields(soft, grey.shape) for soft, grey in zip(raw, greys, strict=True)]
        for small, (_, *lungs) in zip(smalls, found, strict=True):
            self._remember(small, _confidence(*lungs))
        return [fields for fields, *_ in found]

    def orientation(self, grey: np.ndarray, sideways: bool = False) -> str | None:
        """Why a uint8 HxW image is not upright (None when it is): the segmenter is compared on the image and on
        it turned 180° and flipped top to bottom (with ``sideways``, also turned 90° either way), and a turned
        view that beats the image by ``ORIENTATION_MARGIN`` and shows two plausible lungs names how to turn it back.
        The image's own confidence is the one ``segment`` just found for the lung crop where it is still kept (same
        model input, same map: onnxruntime gives each image of a batch the numbers it gives it alone), so only the
        turned views are segmented, and not even those where it reaches ``UPRIGHT_CONFIDENCE``."""
        small = self._model_input(grey)
        upright = self._recall(small)
        if upright is None:
            upright = self.confidence(self.probabilities([small])[0])
        if upright >= UPRIGHT_CONFIDENCE:
            return None
        turns = list(TURNS)[: 4 if sideways else 2]
        softs = list(self.probabilities([np.ascontiguousarray(TURNS[turn](small)) for turn in turns]))
        # A view's confidence is at most 1 minus its uncertain share (its mean probability is at most 1), or 0: a view
        # whose bound cannot beat the margin is not labelled (upright films: about 97% of turned views). The best view
        # decides only where it beats the margin, and then it is among those labelled: the same verdict as before.
        bar = upright + ORIENTATION_MARGIN
        scores = [self.confidence(soft) if _confidence_bound(soft, self.threshold) > bar else -1.0 for soft in softs]
        best = int(np.argmax(scores))
        if scores[best] <= bar or self.fields(softs[best], small.shape).reason:
            return None  # upright, or no turn shows two plausible lungs either
        return f"not upright (its lungs look upright once it is {turns[best]}): give the film upright"

    def confidence(self, soft: np.ndarray) -> float:
        """How sure the segmenter is of the lungs in one uint8 probability map: the mean probability of the kept
        lungs minus the share of uncertain pixels (0-1; 0 without lungs)."""
        probability = soft.astype(np.float32) / 255.0
        called = probability >= self.threshold
        kept, _ = keep_lungs(called)
        return _confidence(probability, called, kept)

    def fields(self, soft: np.ndarray, shape: tuple[int, ...]) -> LungFields:
        """Post-processing of one model-resolution uint8 probability map, scaled to an image of ``shape``."""
        return self._fields(soft, shape)[0]

    def _fields(
        self, soft: np.ndarray, shape: tuple[int, ...]
    ) -> tuple[LungFields, np.ndarray, np.ndarray, np.ndarray]:
        """``fields``, and the probabilities, pixels called lung and kept lungs ``confidence`` needs: ``segment``
        keeps the confidence for ``orientation`` without labelling the lungs again."""
        probability = soft.astype(np.float32) / 255.0
        called = probability >= self.threshold
        kept, lungs = keep_lungs(called)
        area_fraction = float(kept.mean())
        reason = lung_reason(lungs, area_fraction, probability, self.threshold)
        height, width = shape[:2]
        scaled = Image.fromarray(kept.astype(np.uint8) * 255).resize((width, height), Image.Resampling.BILINEAR)
        mask = np.asarray(scaled) >= 128
        box = None if reason else _box(mask)
        return LungFields(mask=mask, box=box, area_fraction=area_fraction, reason=reason), probability, called, kept


def _confidence(probability: np.ndarray, called: np.ndarray, kept: np.ndarray) -> float:
    """``LungSegmenter.confidence`` from a map's probabilities (0-1), the pixels called lung and the kept lungs."""
    if not kept.any():
        return 0.0
    uncertain = ((probability > 0.25) & (probability < 0.75)).sum() / max(1, called.sum())
    return float(probability[kept].mean() - uncertain)


def _confidence_bound(soft: np.ndarray, threshold: float) -> float:
    """An upper bound of ``LungSegmenter.confidence`` for one uint8 probability map, without labelling its lungs:
    1 minus the uncertain share (the same counts ``_confidence`` takes), or 0 where that is lower (a map without
    lungs has confidence 0)."""
    probability = soft.astype(np.float32) / 255.0
    uncertain = ((probability > 0.25) & (probability < 0.75)).sum() / max(1, (probability >= threshold).sum())
    return max(0.0, float(1.0 - uncertain))


def _torch_segmenter(weights: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The segmenter in torch (the lab's entry point ``covidxr.lungs``), for a machine without onnxruntime."""
    try:
        return entry_point("covidxr.lungs", "torch")(weights)
    except ImportError:
        raise CovidxrError("the lung segmenter needs onnxruntime: pip install onnxruntime") from None


_segmenter: LungSegmenter | None = None
_lock = threading.Lock()


def lung_segmenter() -> LungSegmenter:
    """The bundled segmenter, built once per process on first use."""
    global _segmenter
    with _lock:
        if _segmenter is None:
            _segmenter = LungSegmenter()
        return _segmenter


def find_lungs(grey: np.ndarray, cache_dir: str | Path | None = None) -> LungFields:
    """The lungs of a uint8 HxW image by the bundled segmenter: the runtime's one entry point to it
    (preprocessing's lung crop, the lung check, Grad-CAM's lung share and ``covidxr segment`` call this)."""
    return lung_segmenter().segment(grey, None if cache_dir is None else Path(cache_dir))


def find_orientation(grey: np.ndarray, sideways: bool = False) -> str | None:
    """Why a uint8 HxW image is not upright, by the bundled segmenter (``LungSegmenter.orientation``), or None."""
    return lung_segmenter().orientation(grey, sideways)
