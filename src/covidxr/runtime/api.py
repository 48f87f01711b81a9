"""The Python API: ``covidxr.load_model(run)`` → ``model.predict(image_or_images)`` / ``model.explain(...)``.

An image may be a file path (PNG, JPEG, TIFF, DICOM; ``str`` or ``Path``) or a decoded image (a PIL
image or an HxW / HxWx3 uint8 array). One image gives one result (a dict), a list gives a list.
Every result carries the research-use disclaimer. The command line is built on the same functions
(``covidxr.runtime.inference``), so both answer alike.

>>> import covidxr
>>> model = covidxr.load_model()                       # the bundled model
>>> result = model.predict("chest.png")                # one result
>>> result["label"], result["probabilities"]["COVID-19"], result["no_answer_reason"]
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from covidxr.runtime.answers import threshold_source, with_threshold
from covidxr.runtime.batches import prepare
from covidxr.runtime.cam import (
    DenseHead,
    contact_sheets,
    contact_thumbnail,
    empty_map,
    gradcam,
    lung_shares,
    lungs_on_input,
    overlay,
)
from covidxr.runtime.engines import TRAIN_EXTRA, OnnxEngine, torch_available
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.foreign import NO_SITE, ForeignModel, is_foreign_model
from covidxr.runtime.images import SINGLE_IMAGE, ImageLike, as_image, image_facts, read_image, single_answer
from covidxr.runtime.inference import (
    FILE_BATCH,
    answer,
    expand_inputs,
    is_folder,
    output_name,
    predict_files,
    with_folders_expanded,
)
from covidxr.runtime.ood import is_blank
from covidxr.runtime.plugins import entry_point
from covidxr.runtime.runners import Engine, input_transform, make_engine
from covidxr.runtime.runs import HEAD_FILE, Run, default_model_path, load_run
from covidxr.runtime.site import SiteCalibration, with_site
from covidxr.runtime.storage import output_folder, write_file

__all__ = ["ForeignModel", "ImageLike", "METHODS", "Model", "load_model"]

METHODS = ("gradcam", "gradcam++", "scorecam", "eigencam")  # covidxr.lab.explain.METHODS, without importing torch


class Model:
    """A trained covidxr model, ready to predict and explain; make one with ``covidxr.load_model``.

    >>> model = covidxr.load_model("runs/lite0")
    >>> model.labels
    ['COVID-19', 'NORMAL', 'PNEUMONIA']
    """

    def __init__(self, run: Run, engine: str = "auto", cache_dir: str | Path | None = None, threads: int | None = None):
        self.run, self.cache_dir = run, cache_dir
        self.engine = make_engine(run, engine, cache_dir, threads)
        self.transform = input_transform(run, self.engine)

    def __repr__(self) -> str:
        engine = type(self.engine).__name__.removesuffix("Engine").lower()
        return (
            f"covidxr.Model(backbone={self.run.info.model['name']!r}, run={self.run.path.name!r}, "
            f"labels={self.labels}, "
            f"covid_threshold={self.run.covid_threshold:.3f} ({threshold_source(self.run)}), "
            f"site={None if self.run.site is None else self.run.site.site!r}, engine={engine!r})"
        )

    @property
    def labels(self) -> list[str]:
        """The classes, in the order of the probabilities."""
        return self.run.labels

    @property
    def covid_threshold(self) -> float:
        """The COVID-19 threshold that decides: the site file's where one is applied, else the run's."""
        return self.run.covid_threshold

    @property
    def site(self) -> SiteCalibration | None:
        return self.run.site

    @property
    def decode_side(self) -> int | None:
        """The smallest side a JPEG upload may be draft-decoded to (the service's decoder)."""
        return self.transform.decode_side

    def predict(self, images: ImageLike | Sequence[ImageLike], batch_size: int = FILE_BATCH) -> dict | list[dict]:
        """Label, calibrated probabilities, COVID-19 call and out-of-distribution flag of one image, or of each
        image of a list.

        ``label`` is the decision: COVID-19 when its probability reaches the run's operating threshold
        (``covid_threshold``), else the more probable other class; ``covid_positive`` always agrees.
        An image unlike the training X-rays gets ``label`` ``None`` and ``no_answer_reason``.
        An image may be a path, the bytes of a file, a PIL image or an array (``covidxr.runtime.images.as_image``:
        float arrays hold intensities in [0, 1], 16-bit arrays are scaled as 16-bit files are); a folder gives
        the list of its files' results (``expand_inputs``). In a list an image that cannot be read gets ``error``
        instead of a label; a single image that cannot be read raises ``CovidxrError``.

        >>> model.predict("a.png")["label"]
        'NORMAL'
        >>> [r["label"] for r in model.predict(["a.png", Image.open("b.png")])]
        ['NORMAL', None]
        """
        if batch_size < 1:
            raise CovidxrError(f"batch_size must be at least 1, not {batch_size}")
        if isinstance(images, SINGLE_IMAGE) and not is_folder(images):
            if not isinstance(images, str | Path):  # decoded here, so its own error is raised (ImageTooLarge: 413)
                images = as_image(images)
            return single_answer(self.predict([images], batch_size))
        images = with_folders_expanded(images)
        if all(isinstance(item, str | Path) for item in images):
            return predict_files(self.run, images, self.cache_dir, batch_size, progress=False, engine=self.engine)
        results = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            decoded: list[Image.Image | str] = []
            for item in chunk:  # in a list, one bad image gets its error and the others their answers
                try:
                    decoded.append(as_image(item))
                except CovidxrError as exc:
                    decoded.append(str(exc))
            good = [image for image in decoded if not isinstance(image, str)]
            answers = iter(self.answer_prepared([self.prepare(image) for image in good]) if good else [])
            for item, image in zip(chunk, decoded, strict=True):
                name = {"file": output_name(item)} if isinstance(item, str | Path) else {}
                if isinstance(image, str):
                    results.append({**name, "error": image})
                else:
                    results.append({**name, **next(answers), "image": image_facts(image)})
        return results

    def prepare(self, image: Image.Image) -> tuple[np.ndarray, bool, str | None]:
        """A decoded image's model input, whether it is blank, and why its lungs rule out an answer (None when
        they do not): the CPU work before the engine, which callers may run on several threads."""
        array, reason = prepare(self.transform, image)
        return array, is_blank(image), reason or None

    def answer_prepared(self, prepared: Sequence[tuple[np.ndarray, bool, str | None]]) -> list[dict]:
        """``predict``'s results for images already ``prepare``d, with one engine call for them all."""
        arrays, blanks, reasons = zip(*prepared, strict=True)
        features, logits = self.engine(np.stack(arrays))
        return answer(self.run, features, logits, blanks, reasons, getattr(self.engine, "ood_threshold", None))

    def explain(self, images: ImageLike | Sequence[ImageLike], method: str = "gradcam") -> dict | list[dict]:
        """``predict``'s answer plus the class activation map (``map``, input-sized floats in [0, 1])
        of ``target`` — the label, or the most probable class for an image given no answer — and its
        ``overlay`` on the image (a PIL image); ``map_empty`` is true for an all-zero map (no class-specific
        activation: nothing to show, and no lung share). Grad-CAM of a model whose graph holds its activations
        (the bundled model) is computed in numpy (``covidxr.runtime.cam``); other methods and models run in torch.

        >>> model.explain("a.png")["overlay"].save("a.gradcam.png")
        """
        if method not in METHODS:
            raise CovidxrError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
        if isinstance(images, SINGLE_IMAGE) and not is_folder(images):
            return single_answer(self.explain([images], method))
        results: list[dict] = []
        items = with_folders_expanded(images)
        for item in items:  # one bad image gets its error; the others are explained
            name = {"file": output_name(item)} if isinstance(item, str | Path) else {}
            try:
                results.append({**name, "image": as_image(item)})
            except CovidxrError as exc:
                results.append({**name, "error": str(exc)})
        good = [i for i, result in enumerate(results) if "image" in result]
        if good:
            explained = self._explain_decoded([results[i].pop("image") for i in good], method)
            for i, result in zip(good, explained, strict=True):
                results[i] |= result
        return results

    def _explain_decoded(self, decoded: list[Image.Image], method: str) -> list[dict]:
        """``explain`` of decoded images, one engine call for them all."""
        prepared = [self.prepare(image) for image in decoded]
        inputs = np.stack([array for array, _, _ in prepared])
        activation = self._numpy_cam if method == "gradcam" else None
        if activation is not None:  # one engine call gives the answer and the activations
            features, logits, activations = self.engine.with_activations(inputs)
            _, blanks, reasons = zip(*prepared, strict=True)
            results = answer(self.run, features, logits, blanks, reasons, self.engine.ood_threshold)
        else:
            results = self.answer_prepared(prepared)
        targets = [r["label"] or max(r["probabilities"], key=r["probabilities"].get) for r in results]
        classes = np.array([self.labels.index(target) for target in targets])
        if activation is not None:
            maps = gradcam(activations, self._dense_head, classes, activation, self.transform.image_size)
        else:
            maps = self._torch_maps(inputs, classes, method)
        for result, image, cam, target in zip(results, decoded, maps, targets, strict=True):
            seen = self.transform.pipeline(image)
            empty = empty_map(cam)  # drawn, it would read as an even spread of attention: the image alone
            result |= {
                "method": method,
                "target": target,
                "map": cam,
                "map_empty": empty,
                "overlay": seen.convert("RGB") if empty else overlay(seen, cam),
            }
        return results

    def explain_files(
        self, paths: Sequence[str | Path], out: str | Path, method: str = "gradcam", batch_size: int = 8
    ) -> list[dict]:
        """``explain`` each file (a folder: each of its files) into ``out``: ``<name>.<method>.png`` (overlay) and
        ``.npy`` (raw map); each result also says how much of the map lies inside the lungs (``lung_share``; None
        where the lungs are not found or the map is empty, ``map_empty``). Unreadable files get their ``error`` and
        are skipped; the others are still explained. Where more than one image is explained,
        ``contact-sheet.<method>.png`` shows every overlay with its name and answer (in sheets of ``SHEET_SIZE``),
        so a folder can be looked over at a glance."""
        out = output_folder(out)
        paths = expand_inputs(paths)
        results: list[dict] = []
        used_names: set[str] = set()
        thumbnails: list[tuple[str, str, Image.Image]] = []
        for start in range(0, len(paths), batch_size):  # decoded a batch at a time: memory stays bounded
            batch = paths[start : start + batch_size]
            explained = self.explain(batch, method)
            ready = [(path, result) for path, result in zip(batch, explained, strict=True) if "error" not in result]
            size, pipeline = self.transform.image_size, self.transform.pipeline
            images = [read_image(path) for path, _ in ready]
            shares = lung_shares(
                np.stack([result["map"] for _, result in ready]) if ready else np.zeros((0, size, size)),
                [lungs_on_input(size, pipeline, image) for image in images],
            )
            for (path, result), image, share in zip(ready, images, shares, strict=True):
                name = Path(path).stem
                name = name if name not in used_names else f"{name}-{len(used_names)}"
                used_names.add(name)
                overlay_path, map_path = out / f"{name}.{method}.png", out / f"{name}.{method}.npy"
                cam = result.pop("map")
                # Written whole: a full disk leaves no truncated .npy or .png, and stops with one line.
                shown = image.convert("RGB") if result["map_empty"] else overlay(image, cam)
                write_file(overlay_path, _encoded(shown))
                write_file(map_path, _encoded(cam.astype(np.float32)))
                thumbnails.append((Path(path).name, result["label"] or "no answer", contact_thumbnail(shown)))
                result |= {
                    "probability": result["probabilities"][result["target"]],
                    "lung_share": None if np.isnan(share) else float(share),
                    "overlay": str(overlay_path),
                    "map": str(map_path),
                }
            results += explained
        if len(thumbnails) > 1:
            for number, sheet in enumerate(contact_sheets(thumbnails), start=1):
                suffix = "" if number == 1 else f"-{number}"
                sheet.save(out / f"contact-sheet{suffix}.{method}.png")
        return results

    def write_dicom(self, paths: Sequence[str | Path], out: str | Path) -> list[dict]:
        """For each DICOM file a Structured Report (TID 1500) and a Grad-CAM Secondary Capture in its study,
        written into ``out`` (``covidxr.runtime.dicom_out``; needs ``covidxr[pacs]``); one row per path with
        ``sr`` and ``sc``, ``error`` (no SR), or ``skipped`` (not DICOM)."""
        from covidxr.runtime.dicom_out import write_dicom_results

        return write_dicom_results(self, paths, out)

    @classmethod
    def with_engine(cls, run: Run, engine: Engine) -> Model:
        """A model around an engine already made (``predict --dicom-out`` shares ``predict``'s)."""
        model = cls.__new__(cls)
        model.run, model.cache_dir, model.engine = run, None, engine
        model.transform = input_transform(run, engine)
        return model

    def _torch_maps(self, inputs: np.ndarray, classes: np.ndarray, method: str) -> np.ndarray:
        """CAM maps by pytorch-grad-cam (the methods and models ``covidxr.runtime.cam`` does not cover), from
        the lab's entry point ``covidxr.cam``."""
        if not torch_available():
            raise CovidxrError(f"{method} for this model needs torch: {TRAIN_EXTRA}")
        return entry_point("covidxr.cam", "torch")(self.run, inputs, classes, method)

    @cached_property
    def _dense_head(self) -> DenseHead:
        """The head's weights in numpy, read once per model (the service explains image after image)."""
        return DenseHead(self.run.path / HEAD_FILE)

    @cached_property
    def _numpy_cam(self) -> str | None:
        """The elementwise step for ``covidxr.runtime.cam`` where this engine's graph holds the Grad-CAM activations."""
        if not isinstance(self.engine, OnnxEngine) or "activations" not in self.engine.outputs:
            return None
        return self.engine.sidecar.cam_activation if self.engine.sidecar is not None else None


def _encoded(item: Image.Image | np.ndarray) -> bytes:
    """An image as PNG bytes, an array as ``.npy`` bytes, for ``storage.write_file``."""
    buffer = io.BytesIO()
    if isinstance(item, Image.Image):
        item.save(buffer, format="PNG")
    else:
        np.save(buffer, item)
    return buffer.getvalue()


def load_model(
    path: str | Path | None = None,
    engine: str = "auto",
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    weights: str | Path | None = None,
    weights_dir: str | Path | None = None,
    site: str | Path | SiteCalibration | None = None,
    spec: str | Path | None = None,
    threshold: float | None = None,
) -> Model | ForeignModel:
    """A trained model from a run folder (``covidxr train`` / ``reproduce`` output), or with no path
    the model bundled with the package (see its card: ``covidxr model-card``), or a model covidxr did not
    train: ``MODEL.onnx`` with its spec (``MODEL.yaml`` beside it, or ``spec``), as a ``ForeignModel`` whose
    ``predict`` gives the same keys, one answer per image (``covidxr.runtime.foreign``: no out-of-distribution
    guard, no ``site``, no Grad-CAM; ``threads`` applies, ``engine`` must be auto or onnx).

    ``engine``: ``auto`` (onnxruntime on a CPU where it is installed, else torch), ``torch`` or ``onnx``;
    ``threads``: onnxruntime's intra-op threads (default: half the physical cores, ``shared_engine_threads``);
    ``weights`` / ``weights_dir``: where the backbone's weights are, where the torch model is needed; ``site``: a
    ``site.json`` made by ``covidxr calibrate`` for this model, whose COVID-19 threshold then decides
    instead of the run's (each result names it in ``site``); ``threshold``: a COVID-19 threshold of your own
    choosing instead (not with ``site``; each result says ``threshold_source`` ``user``).

    >>> model = covidxr.load_model()                 # or load_model("runs/lite0")
    >>> model.predict("chest.png")["label"]
    'NORMAL'
    """
    if is_foreign_model(path, spec):
        if path is None:
            raise CovidxrError("spec is for a foreign ONNX model: give its MODEL.onnx too")
        if Path(path).is_dir():
            raise CovidxrError(f"{path}: a covidxr run folder describes itself; a spec is for an ONNX graph")
        if site is not None:
            raise CovidxrError(NO_SITE)
        if threshold is not None:
            raise CovidxrError(
                "threshold is for covidxr runs; a foreign model's comes from its spec (output.threshold)"
            )
        if engine not in ("auto", "onnx"):
            raise CovidxrError(f"a foreign ONNX model runs on onnxruntime: engine {engine!r} is for covidxr runs")
        return ForeignModel(path, spec, threads)
    run = load_run(path if path is not None else default_model_path(), weights, weights_dir)
    return Model(with_threshold(with_site(run, site), threshold), engine, cache_dir, threads)
