"""Prediction: the one API behind ``covidxr predict``, the Python API and the web service (runtime layer).

With a run that holds its exported graph (the bundled model does), everything here runs on numpy,
Pillow and onnxruntime: torch is imported only for the torch engine or a run without a graph."""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from covidxr import DISCLAIMER
from covidxr.runtime.answers import decision_note, seen_in_training, threshold_source, training_hashes, weakness
from covidxr.runtime.batches import iterate_batches
from covidxr.runtime.calibration import POSITIVE, decide, softmax
from covidxr.runtime.cam import COLOUR_PHOTOGRAPH
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import SINGLE_IMAGE, ImageLike, file_sha256
from covidxr.runtime.runners import Engine, input_transform, make_engine
from covidxr.runtime.runs import Run
from covidxr.runtime.site import describe_set

__all__ = [
    "BLANK",
    "FILE_BATCH",
    "OUT_OF_DISTRIBUTION",
    "answer",
    "expand_inputs",
    "is_folder",
    "iterate_predictions",
    "output_name",
    "path_from_output_name",
    "predict_files",
    "printable",
    "spreadsheet_text",
    "text_from_spreadsheet",
    "with_folders_expanded",
]

logger = logging.getLogger(__name__)


OUT_OF_DISTRIBUTION = "not a chest X-ray like the training images"
BLANK = "a nearly uniform (blank) image"
# Images per engine call when predicting files: small batches keep the pipeline's fill and drain (the first batch
# decoded while the engine waits, the last classified while the decoders wait) short, and onnxruntime runs this
# classifier as fast per image in batches of 8 as of 32 (benchmarks/archive.py).
FILE_BATCH = 8
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # how a spreadsheet formula may begin (as a CSV cell)


def answer(
    run: Run,
    features: np.ndarray,
    logits: np.ndarray,
    blank: Sequence[bool],
    reasons: Sequence[str | None] | None = None,
    ood_threshold: float | None = None,
    digests: Sequence[str | None] | None = None,
) -> list[dict]:
    """What covidxr says of each image, from the engine's features and logits.

    ``label`` is the decision (``covidxr.runtime.calibration.decide``): COVID-19 when the calibrated COVID-19
    probability reaches the run's operating threshold, else the more probable other class, so it always
    agrees with ``covid_positive``. An image the out-of-distribution guard flags, a nearly uniform one
    (``blank``), or one with a caller's reason (``reasons``, one per image, e.g. lungs not found) gets
    no answer: ``label`` and ``covid_positive`` are ``None`` and ``no_answer_reason`` says why; its
    probabilities stay, for research. ``covid_threshold`` is the threshold that decided and ``site`` the site
    file it came from (``None``: the run's own, chosen on its validation split). ``out_of_distribution`` is
    ``None`` for runs made before the guard.
    ``ood_threshold`` replaces the guard's own where an engine's features need another (int8). A colour
    photograph's reason (``covidxr.runtime.cam.colour_reason``) is its only one: it is not an X-ray at all.

    Beside every answer (``covidxr.runtime.answers``): ``weakness``, the model's held-out weakness in one line;
    ``decision_note``, why the label is not the most probable class (None where it is); ``threshold_source``
    (``model``, ``site`` or ``user``); ``seen_in_training``, whether the image file (SHA-256 in ``digests``,
    one per image) is in the run's training split (None where it cannot be told).

    With a site file that holds conformal thresholds (``covidxr calibrate --coverage``), each answered image
    also gets ``prediction_set``: the classes k with ``1 - p_k <= q_k``, in label order. The set then decides:
    an image whose set is exactly one class is answered with that class; any other set (several classes, or
    none) is answered "indeterminate": ``label`` ``None`` and ``no_answer_reason`` "indeterminate: {A, B}"
    (or "indeterminate: {}"), so there is still one answer per image.
    """
    labels, covid, threshold = run.labels, run.labels.index(POSITIVE), run.covid_threshold
    site = None if run.site is None else run.site.path or run.site.site
    probabilities = softmax(logits.astype(np.float64), run.temperature)
    decisions = decide(probabilities, labels, threshold)
    guard = run.ood_guard
    scores = guard.score(features) if guard is not None else [None] * len(features)
    reasons = reasons if reasons is not None else [None] * len(features)
    digests = digests if digests is not None else [None] * len(features)
    weak, chosen_by = weakness(run), threshold_source(run)
    sets = None if run.site is None else run.site.set_thresholds
    limits = None if sets is None else np.array([sets[label] for label in labels])
    results = []
    rows = zip(probabilities, decisions, scores, blank, reasons, digests, strict=True)
    for p, decision, score, flat, given, digest in rows:
        unlike = guard is not None and bool(score > (ood_threshold or guard.threshold))
        why = [text for text, applies in ((BLANK, flat), (OUT_OF_DISTRIBUTION, unlike), (given, given)) if applies]
        if given and given.startswith(COLOUR_PHOTOGRAPH):
            why = [given]
        members = None
        if limits is not None and not why:
            members = [label for label, inside in zip(labels, 1.0 - p <= limits, strict=True) if inside]
            if len(members) == 1:
                decision = labels.index(members[0])
            else:
                why.append(f"indeterminate: {describe_set(members)}")
        answered = not why
        label = labels[int(decision)] if answered else None
        shares = {name: float(v) for name, v in zip(labels, p, strict=True)}
        results.append(
            {
                "label": label,
                "no_answer_reason": None if answered else "; ".join(why),
                **({} if limits is None else {"prediction_set": members}),
                "probabilities": shares,
                "decision_note": decision_note(shares, label, threshold, by_set=limits is not None),
                "weakness": weak,
                "seen_in_training": seen_in_training(run, digest),
                "covid_threshold": threshold,
                "threshold_source": chosen_by,
                "site": site,
                "covid_positive": bool(decision == covid) if answered else None,
                "out_of_distribution": True if given else None if guard is None else bool(unlike or flat),
                "ood_score": None if score is None else float(score),
                "disclaimer": DISCLAIMER,
            }
        )
    return results


def iterate_predictions(
    run: Run,
    paths: Sequence[Path],
    runner: Engine,
    batch_size: int = FILE_BATCH,
    num_workers: int = 1,
    desc: str | None = None,
) -> Iterator[list[dict]]:
    """The results of ``paths`` batch by batch, in order, decoded on a thread pool while the engine runs
    (so decoding never stops between batches); an unreadable file's result is its ``error``. Each readable
    file's result also has ``image``: its own width, height, bit depth and mode (``images.image_facts``)."""
    transform = input_transform(run, runner)
    batches = iterate_batches(paths, transform, batch_size, num_workers, desc, check_lungs=True, draft=True)
    hashed = training_hashes(run) is not None  # a run without hashes cannot tell: no file is read twice
    for indices, inputs, errors, blanks, lungs, facts in batches:
        features, logits = runner(inputs)
        reasons = [reason or None for reason in lungs]
        digests = [
            _digest(paths[i]) if hashed and not error else None for i, error in zip(indices, errors, strict=True)
        ]
        answers = answer(run, features, logits, blanks, reasons, getattr(runner, "ood_threshold", None), digests)
        yield [
            {"file": output_name(paths[i]), "error": printable(error)}
            if error
            else {"file": output_name(paths[i]), **result, "image": image}
            for i, error, result, image in zip(indices, errors, answers, facts, strict=True)
        ]


def _digest(path: Path) -> str | None:
    """The file's SHA-256, None where it is not a regular file (a FIFO cannot be read twice) or cannot be read
    again (it was read a moment ago)."""
    try:
        return file_sha256(path) if path.is_file() else None
    except OSError:
        return None


def predict_files(
    run: Run,
    paths: Sequence[str | Path],
    cache_dir: str | Path | None = None,
    batch_size: int = FILE_BATCH,
    num_workers: int = 1,
    progress: bool = True,
    engine: str | Engine = "auto",
) -> list[dict]:
    """One result per file — label and calibrated probabilities, or the error — continuing past bad files.

    Files are decoded on a thread pool while the engine (``auto``, ``torch``, ``onnx``, or one made
    by ``make_engine``) runs; nothing is written to the feature cache (prediction is not training, and
    a hospital's images should leave no trace). ``covid_positive`` applies the run's COVID-19
    threshold, chosen on validation data; ``out_of_distribution`` says whether the image is unlike
    the training X-rays (``covidxr.runtime.ood``; ``None`` for runs made before the guard existed).
    """
    runner = make_engine(run, engine, cache_dir) if isinstance(engine, str) else engine
    paths = [Path(p) for p in paths]
    desc = "predict" if progress else None
    batches = iterate_predictions(run, paths, runner, batch_size, num_workers, desc)
    return [result for batch in batches for result in batch]


# ---------------------------------------------------------------------------------------------
# Folders and batches, written as they finish
# ---------------------------------------------------------------------------------------------


def expand_inputs(paths: Sequence[str | Path], patterns: Sequence[str] = ()) -> list[Path]:
    """Files as given, and every file under each folder (recursively, symlinked sub-folders followed once,
    in sorted order), whatever its name: an image is known by its content when it is read (DICOM exported
    as ``IM000001``, ``.webp``, ``.jpe``), and a file that is not an image gets its own row saying so.

    ``patterns`` (shell globs such as ``*.dcm`` or ``IM*``, matched against file names inside folders) keep only
    the files that match one of them; named files are always kept. Broken symlinks, symlink loops and
    sub-folders that cannot be listed are kept too, so each gets a row saying why it could not be read.
    Raises ``CovidxrError`` when nothing is left to read (an empty folder, or a pattern that matches nothing)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += _folder_entries(path, patterns)
        else:
            files.append(path)
    if not files:
        named = ", ".join(printable(str(path)) for path in paths) or "no input"
        matching = f" matching {' or '.join(patterns)}" if patterns else ""
        raise CovidxrError(f"{named}: no files{matching} to read")
    return files


def _folder_entries(folder: Path, patterns: Sequence[str]) -> list[Path]:
    unlisted: list[Path] = []
    seen: set[tuple[int, int]] = set()
    found: list[Path] = []
    for root, folders, names in os.walk(folder, followlinks=True, onerror=lambda e: unlisted.append(Path(e.filename))):
        status = os.stat(root)
        if (status.st_dev, status.st_ino) in seen:  # a symlink back to a folder already read: a loop
            unlisted.append(Path(root))
            folders.clear()
            continue
        seen.add((status.st_dev, status.st_ino))
        found += [Path(root) / name for name in names if not patterns or _matches(name, patterns)]
    return sorted(found + unlisted)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def is_folder(item: object) -> bool:
    """Whether an image argument names a folder (whose files are then each an image)."""
    return isinstance(item, str | Path) and Path(item).is_dir()


def with_folders_expanded(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    """The images as a list, each folder replaced by its files (``expand_inputs``: by content, every file a row)."""
    items = [images] if isinstance(images, SINGLE_IMAGE) else list(images)
    if not any(is_folder(item) for item in items):
        return items
    return [found for item in items for found in (expand_inputs([item]) if is_folder(item) else [item])]


def output_name(path: str | Path) -> str:
    """How a file is named in results and output files: its path, or, where the name is not valid
    UTF-8 (an old archive's Latin-1 name) or holds ``\\x``, the path with every backslash written
    ``\\x5c`` and every byte that is not UTF-8 as ``\\xNN``, so the name stays readable and
    ``path_from_output_name`` gives the exact file back."""
    text = str(path)
    raw = os.fsencode(text)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        if "\\x" not in text:
            return text
    return raw.replace(b"\\", b"\\x5c").decode("utf-8", "backslashreplace")


def path_from_output_name(name: str) -> Path:
    """The file an ``output_name`` names (its inverse)."""
    if "\\x" not in name:
        return Path(name)
    raw = re.sub(rb"\\x([0-9a-f]{2})", lambda match: bytes([int(match[1], 16)]), name.encode("utf-8"))
    return Path(os.fsdecode(raw))


def spreadsheet_text(text: str) -> str:
    """A text cell of a CSV as spreadsheet tools expect it: one that would start a formula (``=``, ``+``, ``-``,
    ``@``, a tab or a carriage return, after any ``'``) gets a leading ``'``, shown as text, so a file named
    ``=HYPERLINK(...)`` is never run. ``text_from_spreadsheet`` takes it off again: every text round-trips."""
    return f"'{text}" if text.lstrip("'").startswith(FORMULA_STARTS) else text


def text_from_spreadsheet(cell: str) -> str:
    """The text a CSV cell written by ``spreadsheet_text`` holds (its inverse)."""
    return cell[1:] if cell.startswith("'") and cell.lstrip("'").startswith(FORMULA_STARTS) else cell


def printable(message: str) -> str:
    """A message that can be written as UTF-8: bytes of a file name that are not UTF-8 become ``\\xNN``."""
    return message.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
