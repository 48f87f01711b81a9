"""A model covidxr did not train (``MODEL.onnx`` with its ``MODEL.yaml`` spec) behind the prediction API.

``covidxr.load_model("model.onnx")`` gives a ``ForeignModel``; ``covidxr predict --model model.onnx``,
``covidxr serve --model model.onnx`` and ``covidxr evaluate model.onnx --data DIR`` use it. Its answers have
the keys and the shape of a covidxr run's (``covidxr.runtime.inference.answer``), one answer per image:

- ``label`` is the model's decision (``OnnxClassifier.decide``): COVID-19 where p(COVID-19) reaches the spec's
  ``output.threshold``, else the most probable other class; without a threshold, the most probable class.
  ``covid_threshold`` is that threshold or ``None``; ``covid_positive`` agrees with ``label``.
- A row the graph gives NaN or Inf for is answered with ``label`` ``None``, ``no_answer_reason`` "the model's
  output is not finite (NaN or Inf)" and ``probabilities`` of ``None`` (JSON has no NaN).
- **No out-of-distribution guard and no lung check**: covidxr's guard is fitted to the features of the model
  it trained, and a foreign graph exposes none, so every readable image is answered; ``out_of_distribution``
  and ``ood_score`` are ``None``, as for covidxr runs made before the guard.
- No site file (``--site``): a site calibration belongs to one covidxr run's identity. No Grad-CAM: it needs a
  covidxr run's backbone activations and head (``explain`` refuses in one line).

numpy, Pillow and onnxruntime only: nothing here needs the training install.
"""

from __future__ import annotations

import html
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image

from covidxr import DISCLAIMER
from covidxr.runtime.answers import decision_note
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import SINGLE_IMAGE, as_image, image_facts, read_image, single_answer
from covidxr.runtime.spec import COVID, GraphSpec, OnnxClassifier
from covidxr.runtime.storage import stable_digest

__all__ = ["NOT_FINITE", "NO_EXPLANATION", "NO_SITE", "ForeignModel", "is_foreign_model"]

NO_EXPLANATION = (
    "Grad-CAM needs a covidxr run folder (its backbone's activations and head); "
    "a foreign ONNX model has none to explain with"
)
FOREIGN_WEAKNESS = (
    "a model covidxr did not train: its error rate at hospitals it never saw is not known here; measure it with "
    "`covidxr evaluate MODEL.onnx --data DIR`"
)
NOT_FINITE = "the model's output is not finite"  # how OnnxClassifier's reason for a NaN or Inf row begins
NO_SITE = "--site is for a covidxr run folder (a site file is tied to one run's identity), not for a foreign ONNX model"


def is_foreign_model(path: str | Path | None, spec: str | Path | None = None) -> bool:
    """Whether ``--model PATH`` names a foreign graph (``*.onnx``, or any file given with ``--spec``) rather than
    a covidxr run folder."""
    if path is None:
        return spec is not None
    path = Path(path)
    return spec is not None or (not path.is_dir() and path.suffix.lower() == ".onnx")


class ForeignModel:
    """A foreign classifier as ``covidxr.load_model`` gives it: ``predict`` answers like a covidxr run's
    ``Model.predict`` (same keys, one answer per image); see the module's docstring for what differs.

    >>> model = covidxr.load_model("model.onnx")                 # model.yaml beside it, or spec="spec.yaml"
    >>> model.predict("chest.png")["label"]
    'COVID-19'
    """

    kind = "onnx"
    site = None  # no site calibration for a foreign model
    decode_side = None  # uploads are decoded whole (no JPEG draft), as files are

    def __init__(self, path: str | Path, spec: str | Path | GraphSpec | None = None, threads: int | None = None):
        self.classifier = OnnxClassifier(path, spec, threads)

    def __repr__(self) -> str:
        path, threshold = str(self.classifier.path), self.covid_threshold
        return f"covidxr.ForeignModel({path!r}, labels={self.labels}, covid_threshold={threshold})"

    @property
    def path(self) -> Path:
        return self.classifier.path

    @property
    def spec(self) -> GraphSpec:
        return self.classifier.spec

    @property
    def labels(self) -> list[str]:
        """The classes, in the order of the probabilities (the spec's ``output.labels``)."""
        return list(self.classifier.labels)

    @property
    def covid_threshold(self) -> float | None:
        """The spec's ``output.threshold``; ``None``: the most probable class decides."""
        return self.classifier.threshold

    @property
    def identity(self) -> str:
        """Which model answered: the graph's file name and SHA-256, and the spec's digest (the same graph read
        with another spec answers otherwise). ``predict --out`` records it on every row, ``serve`` in every answer."""
        spec = stable_digest(self.spec.to_dict())[:12]
        return f"onnx model={self.classifier.name} sha256={self.classifier.sha256[:12]} spec={spec}"

    def describe_decision(self) -> str:
        """How ``label`` is chosen, as a phrase ("the model's most probable class ...")."""
        if self.covid_threshold is None:
            return "the model's most probable class (its spec sets no output.threshold)"
        return (
            f"COVID-19 when p(COVID-19) reaches {self.covid_threshold:.3f} (the spec's output.threshold), "
            "otherwise the more probable other class"
        )

    # -----------------------------------------------------------------------------------------
    # Answers
    # -----------------------------------------------------------------------------------------

    def _answers(self, images: Sequence[Image.Image]) -> list[dict]:
        outputs = self.classifier.predict_proba(list(images))
        decisions = self.classifier.decide(outputs.probabilities)
        results = []
        for row, decision, reason in zip(outputs.probabilities, decisions, outputs.reasons, strict=True):
            answered = reason is None and decision is not None
            shares = {label: float(p) if answered else None for label, p in zip(self.labels, row, strict=True)}
            chosen = answered and self.covid_threshold is not None
            results.append(
                {
                    "label": decision if answered else None,
                    "no_answer_reason": None if answered else reason or NOT_FINITE,
                    "probabilities": shares,
                    "decision_note": decision_note(shares, decision, self.covid_threshold) if chosen else None,
                    "weakness": FOREIGN_WEAKNESS,
                    "seen_in_training": None,  # covidxr does not know its training images
                    "covid_threshold": self.covid_threshold,
                    "threshold_source": "spec",
                    "site": None,
                    "covid_positive": decision == COVID if answered else None,
                    "out_of_distribution": None,  # no covidxr guard for a foreign model (see the module docstring)
                    "ood_score": None,
                    "disclaimer": DISCLAIMER,
                }
            )
        return results

    def predict(self, images, batch_size: int = 16) -> dict | list[dict]:
        """The answer for one image (a path, a file's bytes, a PIL image or an array, as ``covidxr.Model.predict``
        takes them), or a list of answers for a list of them or a folder; keys as ``covidxr.Model.predict``'s. In a
        list of paths an unreadable file gets ``error`` instead of a label; a single path that cannot be read, and
        any bad decoded image, raise ``CovidxrError``."""
        from covidxr.runtime.inference import is_folder, with_folders_expanded

        if batch_size < 1:
            raise CovidxrError(f"batch_size must be at least 1, not {batch_size}")
        if isinstance(images, SINGLE_IMAGE) and not is_folder(images):
            return single_answer(self.predict([images], batch_size))
        images = with_folders_expanded(images)
        if images and all(isinstance(item, str | Path) for item in images):
            return self.predict_files(images, batch_size)
        decoded = [as_image(item) for item in images]
        results = []
        for start in range(0, len(decoded), batch_size):
            chunk = decoded[start : start + batch_size]
            answers = self._answers(chunk)
            results += [{**result, "image": image_facts(image)} for result, image in zip(answers, chunk, strict=True)]
        return results

    def iterate_files(self, paths: Sequence[str | Path], batch_size: int = 16) -> Iterator[list[dict]]:
        """The results of ``paths`` batch by batch, in order, each named by its ``file``; an unreadable file's
        result is its ``error`` (as ``covidxr.runtime.inference.iterate_predictions`` gives a run's); a readable
        file's has ``image``, its own width, height, bit depth and mode (``images.image_facts``)."""
        from covidxr.runtime.inference import output_name, printable

        paths = [Path(p) for p in paths]
        for start in range(0, len(paths), batch_size):
            batch = paths[start : start + batch_size]
            images: dict[int, Image.Image] = {}
            errors: dict[int, str] = {}
            for i, path in enumerate(batch):
                try:
                    images[i] = read_image(path)
                except CovidxrError as exc:
                    errors[i] = printable(str(exc))
            answers = dict(zip(images, self._answers(list(images.values())), strict=True)) if images else {}
            yield [
                {"file": output_name(path), "error": errors[i]}
                if i in errors
                else {"file": output_name(path), **answers[i], "image": image_facts(images[i])}
                for i, path in enumerate(batch)
            ]

    def predict_files(self, paths: Sequence[str | Path], batch_size: int = 16) -> list[dict]:
        """One result per file, continuing past unreadable ones (``iterate_files``, gathered)."""
        return [result for batch in self.iterate_files(paths, batch_size) for result in batch]

    # What the service's micro-batcher calls (``covidxr.runtime.serve``): the spec's preprocessing runs with the
    # model call, so an upload's "prepared" input is the decoded image itself.
    def prepare(self, image: Image.Image) -> tuple[Image.Image, bool, None]:
        return image, False, None

    def answer_prepared(self, prepared: Sequence[tuple[Image.Image, bool, None]]) -> list[dict]:
        return self._answers([image for image, _, _ in prepared])

    # -----------------------------------------------------------------------------------------
    # What a foreign model cannot do
    # -----------------------------------------------------------------------------------------

    def explain(self, images, method: str = "gradcam"):
        """Refused: ``CovidxrError`` (one line). Grad-CAM needs a covidxr run's activations and head."""
        raise CovidxrError(f"{self.classifier.name}: {NO_EXPLANATION}")

    def explain_files(self, paths, out, method: str = "gradcam", batch_size: int = 8):
        """Refused, as ``explain``."""
        raise CovidxrError(f"{self.classifier.name}: {NO_EXPLANATION}")

    # -----------------------------------------------------------------------------------------
    # The service's model card
    # -----------------------------------------------------------------------------------------

    def card(self) -> dict:
        """What the service's ``/api/model`` says of a foreign model: its files, spec and what covidxr does not know."""
        return {
            "kind": "foreign ONNX model",
            "file": self.classifier.name,
            "sha256": self.classifier.sha256,
            "labels": self.labels,
            "covid_threshold": self.covid_threshold,
            "decision": self.describe_decision(),
            "spec": self.spec.to_dict(),
            "not_known": (
                "covidxr did not train this model: its training data, metrics, shortcut audit and model card are "
                "not known here, and it has no out-of-distribution guard (every readable image is answered); "
                "measure it with `covidxr evaluate MODEL.onnx --data DIR`"
            ),
            "disclaimer": DISCLAIMER,
        }

    def card_html(self) -> str:
        """``card`` as the service's /model-card page."""
        card = self.card()
        rows = "".join(
            f"<tr><th scope='row'>{html.escape(key)}</th><td>{html.escape(str(card[key]))}</td></tr>"
            for key in ("file", "sha256", "labels", "decision", "spec")
        )
        return (
            "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>covidxr: foreign model</title>"
            "<link rel='stylesheet' href='/static/style.css'></head><body>"
            f"<div id='disclaimer' class='disclaimer' role='note'><strong>{html.escape(DISCLAIMER)}</strong></div>"
            f"<h1>Foreign model {html.escape(self.classifier.name)}</h1><p>{html.escape(card['not_known'])}.</p>"
            f"<table>{rows}</table><p><a href='/'>Back to the viewer</a></p></body></html>"
        )
