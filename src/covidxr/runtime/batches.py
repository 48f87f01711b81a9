"""Decoding and preprocessing files into model-input batches on a thread pool (runtime layer).

Decoding (Pillow, pydicom), the lung segmenter (onnxruntime) and the resize release the GIL, so a
few threads keep the engine fed without the start-up cost and pickling of worker processes. At most
two batches are in flight ahead of the consumer, so memory stays bounded on folders of any size.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from covidxr.runtime.cam import colour_reason
from covidxr.runtime.dicom import VIEW_REFUSAL
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import image_facts, read_image
from covidxr.runtime.lungs import find_lungs, find_orientation
from covidxr.runtime.ood import is_blank
from covidxr.runtime.preprocess import InputTransform, luma

__all__ = ["Batch", "Item", "input_reason", "iterate_batches", "prepare", "progress_bar"]

logger = logging.getLogger(__name__)

# (index, input array CHW float32, error message or "", blank image, why the lungs rule out an answer or "",
# the file's own size, bit depth and mode (``images.image_facts``; None for an unreadable file))
Item = tuple[int, np.ndarray, str, bool, str, dict | None]
# (indices, inputs [batch, 3, size, size], errors, blanks, lung reasons, image facts)
Batch = tuple[list[int], np.ndarray, list[str], list[bool], list[str], list[dict | None]]


class View(Protocol):
    """An augmented view of every image (``covidxr.lab.features.AugmentedView``), fixed per image content."""

    def augment(self, image: Image.Image, rng: np.random.Generator) -> Image.Image: ...

    def generator(self, digest: str) -> np.random.Generator: ...


def prepare(transform: InputTransform, image: Image.Image, check_lungs: bool = True) -> tuple[np.ndarray, str]:
    """A decoded image's model input, and why the image rules out an answer ("" when nothing does): a lung-only
    pipeline that found none, and with ``check_lungs`` the checks every route shares (``input_reason``).
    Every route (files, uploads, the Python API's images) comes through here, so all refuse alike."""
    if not check_lungs:
        array, reason = transform.with_reason(image)
        return array, f"lung check: {reason}" if reason else ""
    grey = luma(image)  # one luma for the pipeline and the checks: the segmenter resizes it once for both
    array, reason = transform.with_reason(image, grey)
    return array, input_reason(image, reason, transform.pipeline.lungs == "none", grey)


def input_reason(
    image: Image.Image, lungs_reason: str | None = None, segment: bool = True, grey: np.ndarray | None = None
) -> str:
    """Why a decoded image gets no answer ("" when it may get one): a DICOM header that rules one out (a lateral
    view, another body part: ``covidxr.runtime.dicom.view_refusal``); a colour photograph; no plausible pair of
    lungs (``lungs_reason`` where the pipeline already looked, else the segmenter when ``segment``); or not upright
    (``covidxr.runtime.lungs.find_orientation``: upside down or flipped, or turned 90° where the lungs were not
    found), which is said instead of the lung check's reason. ``grey``: the image's ``luma``, where already made."""
    view = image.info.get(VIEW_REFUSAL)  # a DICOM header's lateral view or other body part
    if view:
        return view
    colour = colour_reason(image)  # in the one wording predict, explain, the API and the page all use
    if colour:
        return colour
    grey = luma(image) if grey is None else grey
    if lungs_reason is None and segment:
        lungs_reason = find_lungs(grey).reason
    turned = find_orientation(grey, sideways=lungs_reason is not None)
    if turned:
        return turned
    return f"lung check: {lungs_reason}" if lungs_reason else ""


def _item(
    index: int,
    path: Path,
    transform: InputTransform,
    view: View | None,
    digest: str | None,
    check_lungs: bool,
    draft: bool,
) -> Item:
    size = transform.image_size
    try:
        image = read_image(path, transform.decode_side if draft else None)
    except CovidxrError as exc:
        return index, np.zeros((3, size, size), np.float32), str(exc), False, "", None
    facts = image_facts(image)
    if view is not None:
        image = view.augment(image, view.generator(digest))
    array, lungs = prepare(transform, image, check_lungs)
    return index, array, "", is_blank(image), lungs, facts


def iterate_batches(
    paths: Sequence[Path],
    transform: InputTransform,
    batch_size: int,
    num_workers: int,
    desc: str | None,
    view: View | None = None,
    digests: Sequence[str] | None = None,
    check_lungs: bool = False,
    draft: bool = False,
) -> Iterator[Batch]:
    """Yield ``(indices, inputs, errors, blanks, lungs, facts)`` batches in order, decoding on ``num_workers``
    threads (0: in this thread) while the caller runs the model on the previous batch. A file that cannot
    be read yields its error and a zero input; the others carry on. ``draft``: JPEGs are decoded at the
    reduced scale the input needs (``InputTransform.decode_side``; prediction only, never the feature
    cache, so training always sees full decodes)."""
    paths = list(paths)
    starts = range(0, len(paths), batch_size)

    def job(start: int) -> Batch:
        items = [
            _item(i, paths[i], transform, view, None if digests is None else digests[i], check_lungs, draft)
            for i in range(start, min(start + batch_size, len(paths)))
        ]
        return _collate(items)

    def batch_jobs(pool: ThreadPoolExecutor | None) -> Iterator[Batch]:
        if pool is None:
            yield from map(job, starts)
            return
        pending: deque[Future[Batch]] = deque()
        for start in starts:
            pending.append(pool.submit(job, start))
            if len(pending) > 2:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    with progress_bar(len(paths), desc, leave=False) as bar:
        if num_workers <= 0:
            for batch in batch_jobs(None):
                yield batch
                bar.update(len(batch[0]))
            return
        # Each thread decodes a whole batch: one thread per batch keeps the order and the memory bounded.
        with ThreadPoolExecutor(max_workers=max(2, num_workers + 1), thread_name_prefix="covidxr-decode") as pool:
            for batch in batch_jobs(pool):
                yield batch
                bar.update(len(batch[0]))


def progress_bar(total: int, desc: str | None, leave: bool = True):
    """A tqdm bar, or a silent stand-in when ``desc`` is None (tqdm costs ~25 ms to import: one-image
    predictions never show a bar, so they never pay for it)."""
    if desc is None:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=leave)


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, count: int = 1) -> None:
        return None


def _collate(items: list[Item]) -> Batch:
    indices, arrays, errors, blanks, lungs, facts = zip(*items, strict=True)
    return list(indices), np.stack(arrays), list(errors), list(blanks), list(lungs), list(facts)
