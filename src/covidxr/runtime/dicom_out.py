"""covidxr's answers as DICOM objects in the source image's study: a TID 1500 Structured Report and a
Secondary Capture of the Grad-CAM overlay, written with highdicom (``pip install "covidxr[pacs]"``).

A result that is not a DICOM object in the study is a result nobody in a reading room sees, so each DICOM
input gets, in two new series described as research use only:

* a Comprehensive SR holding the TID 1500 Measurement Report: covidxr as the device observer (version, model
  identity, operating point, site file), the image-level evaluation of COVID-19 coded in SNOMED CT
  (present / absent / undetermined), p(COVID-19) as a numeric measurement with its UCUM unit, the
  out-of-distribution flag, the reason for no answer, and a reference to the source image; VerificationFlag
  UNVERIFIED;
* a Secondary Capture of the Grad-CAM overlay with a burnt-in "research use only" line.

Only the source's patient and study modules are copied (highdicom copies them): never a file path, never a
private tag. UIDs derive from the source's SOP Instance UID and the model, so sending a result twice stores
it once. highdicom is imported on first use, so the command line starts as fast without it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from covidxr import DISCLAIMER, __version__
from covidxr.runtime.cam import overlay
from covidxr.runtime.dicom import decode_dicom, view_refusal
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.source import Source, has_dicom_magic, source_label

if TYPE_CHECKING:
    from covidxr.runtime.api import Model

__all__ = [
    "CODES",
    "PACS_EXTRA",
    "DicomResult",
    "dicom_results",
    "iter_dicom_results",
    "model_identity",
    "uid_file_name",
    "write_dicom_results",
    "write_whole",
]

logger = logging.getLogger(__name__)

PACS_EXTRA = 'DICOM output needs highdicom: pip install "covidxr[pacs]"'
SERIES_DESCRIPTION = "covidxr RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE"  # LO: at most 64 characters
BURNT_IN = "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE"
SC_LONG_SIDE = 1024  # the Secondary Capture's longest side, in pixels (a viewer shows it beside the source)
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902
SCHEME = "99COVIDXR"  # a private coding scheme, for what no standard code names (declared in the SR)

# SNOMED CT where a code exists: 840539006 is the disease caused by SARS-CoV-2 (the international release;
# "pneumonia caused by SARS-CoV-2" is only in national extensions). Present/absent (52101004/2667000) and
# undetermined (373068000) are the qualifier values DICOM uses for presence; yes/no (373066001/373067005)
# for a flag. The label's other classes: normal (17621005) and pneumonia (233604007). p(COVID-19) is a
# probability, unit UCUM "1" (no units), named in covidxr's scheme: no standard code names a model's output.
CODES = {
    "covid19": Code("840539006", "SCT", "Disease caused by SARS-CoV-2"),
    "present": Code("52101004", "SCT", "Present"),
    "absent": Code("2667000", "SCT", "Absent"),
    "undetermined": Code("373068000", "SCT", "Undetermined"),
    "yes": Code("373066001", "SCT", "Yes"),
    "no": Code("373067005", "SCT", "No"),
    "normal": Code("17621005", "SCT", "Normal"),
    "pneumonia": Code("233604007", "SCT", "Pneumonia"),
    "lung": Code("39607008", "SCT", "Lung"),
    "chest_xray": Code("399208008", "SCT", "Plain chest X-ray"),
    "unit": Code("1", "UCUM", "no units"),
    "probability": Code("p-covid19", SCHEME, "Probability of COVID-19"),
    "label": Code("label", SCHEME, "covidxr label"),
    "ood": Code("ood", SCHEME, "Unlike the training X-rays (out of distribution)"),
    "reason": Code("no-answer", SCHEME, "Reason for no answer"),
}
_LABEL_CODES = {"COVID-19": "covid19", "NORMAL": "normal", "PNEUMONIA": "pneumonia"}
_PLACING_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


@dataclass
class DicomResult:
    """What covidxr made of one DICOM input: the SR and SC (``None`` with ``error`` when it cannot be read)
    and the answer they hold."""

    source: str
    source_uid: str | None = None  # its SOP Instance UID, once the header is read
    answer: dict | None = None
    sr: Dataset | None = None
    sc: Dataset | None = None
    error: str | None = None
    readable: bool = False  # with an error: the image itself could be read (``predict`` answers it), not its results


def model_identity(model: Model) -> str:
    """The model's identity as the SR's device names it: backbone, run folder, and the head's hash."""
    return _identity(model.run.path, model.run.info.model["name"])


@functools.lru_cache(maxsize=8)
def _identity(run: Path, backbone: str) -> str:
    head = hashlib.sha256((run / "head.safetensors").read_bytes()).hexdigest()[:12]
    return f"{backbone} {run.name} head {head}"


def dicom_results(model: Model, sources: Sequence[Source], batch_size: int = 8) -> list[DicomResult]:
    """The SR and SC of each DICOM source (a path or an in-memory file); ``iter_dicom_results`` as a list."""
    return [result for batch in iter_dicom_results(model, sources, batch_size) for result in batch]


def iter_dicom_results(model: Model, sources: Sequence[Source], batch_size: int = 8) -> Iterator[list[DicomResult]]:
    """The SR and SC of each DICOM source, batch by batch (decoded, explained with Grad-CAM, and let go, so a
    folder of any size fits in memory).

    An unreadable source (no pixel data, a transfer syntax that cannot be decoded, a damaged file, no UIDs to
    place its results) gets its ``error`` and no SR at all; a lateral or non-chest view gets an SR that says
    "no answer" and why."""
    _require_highdicom()
    for start in range(0, len(sources), batch_size):
        chunk = sources[start : start + batch_size]
        results = [DicomResult(source_label(source)) for source in chunk]
        ready: list[tuple[DicomResult, Dataset, Image.Image]] = []
        for result, source in zip(results, chunk, strict=True):
            try:
                header = _read_header(source)
                image, _ = decode_dicom(source)
            except CovidxrError as exc:
                result.error = str(exc)
                continue
            missing = [keyword for keyword in _PLACING_UIDS if not header.get(keyword)]
            if missing:
                result.readable = True
                result.error = (
                    f"{result.source}: DICOM lacks {', '.join(missing)}, needed to place results in its study"
                )
                continue
            result.source_uid = str(header.SOPInstanceUID)
            ready.append((result, header, image))
        explained = model.explain([image for _, _, image in ready], "gradcam") if ready else []
        for (result, header, image), answer in zip(ready, explained, strict=True):
            refusal = view_refusal(header)
            if refusal is not None:
                logger.warning(f"{result.source}: {refusal}; its SR says no answer")
                answer |= {"label": None, "covid_positive": None, "no_answer_reason": refusal}
            cam = answer.pop("map")
            answer.pop("overlay")
            try:
                result.sr = structured_report(model, header, answer)
                result.sc = secondary_capture(header, _sc_pixels(image, cam, answer))
            except (ValueError, TypeError, AttributeError) as exc:  # highdicom's checks of the copied attributes
                result.sr = result.sc = None
                result.readable = True
                result.error = f"{result.source}: cannot write its DICOM results ({_one_line(exc)})"
                continue
            result.answer = answer
        yield results


def write_dicom_results(model: Model, paths: Sequence[str | Path], out: str | Path) -> list[dict]:
    """``dicom_results`` of the DICOM files among ``paths``, written into ``out`` batch by batch as ``<source
    SOP Instance UID>.sr.dcm`` and ``.sc.dcm``; one row per path: ``sr`` and ``sc`` (the files written) with
    ``answer``; ``error`` for a file that cannot be read; ``no_output`` for a readable image whose results cannot be
    written (no UIDs to place them in its study); or ``skipped`` for a file that is not DICOM."""
    out = Path(out)
    rows: list[dict] = [{"file": str(path)} for path in paths]
    dicom = [i for i, path in enumerate(paths) if has_dicom_magic(path)]
    for i in set(range(len(paths))) - set(dicom):
        rows[i]["skipped"] = "not a DICOM file"
    if dicom:
        out.mkdir(parents=True, exist_ok=True)
    results = (result for batch in iter_dicom_results(model, [paths[i] for i in dicom]) for result in batch)
    for i, result in zip(dicom, results, strict=True):
        if result.error is not None:
            rows[i]["no_output" if result.readable else "error"] = result.error
            continue
        name = uid_file_name(result.source_uid)
        rows[i] |= {"sr": str(out / f"{name}.sr.dcm"), "sc": str(out / f"{name}.sc.dcm"), "answer": result.answer}
        write_whole(result.sr, Path(rows[i]["sr"]))
        write_whole(result.sc, Path(rows[i]["sc"]))
    return rows


# ---------------------------------------------------------------------------------------------
# The two objects
# ---------------------------------------------------------------------------------------------


def structured_report(model: Model, source: Dataset, answer: dict) -> Dataset:
    """The Comprehensive SR (TID 1500) of one answer about ``source``, in its study, UNVERIFIED."""
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    from highdicom.sr import (
        AlgorithmIdentification,
        ComprehensiveSR,
        DeviceObserverIdentifyingAttributes,
        FindingSite,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        ObserverContext,
        QualitativeEvaluation,
        SourceImageForMeasurementGroup,
        TextContentItem,
        TrackingIdentifier,
    )
    from highdicom.sr.value_types import RelationshipTypeValues
    from pydicom.sr.codedict import codes

    identity = model_identity(model)
    site = model.site
    parameters = [f"model={identity}", f"covid_threshold={model.covid_threshold:.4f}"]
    if site is not None:
        parameters.append(f"site={site.site} ({Path(site.path).name if site.path else 'in memory'})")
    algorithm = AlgorithmIdentification(name="covidxr", version=__version__, parameters=parameters)
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=_uid("device", identity),
            name="covidxr",
            manufacturer_name="covidxr (research use only)",
            model_name=identity[:64],
            serial_number=f"covidxr {__version__}",
        ),
    )
    if answer["label"] is None:
        presence = CODES["undetermined"]
    else:
        presence = CODES["present"] if answer["covid_positive"] else CODES["absent"]
    evaluations = [QualitativeEvaluation(CODES["covid19"], presence)]
    if answer["label"] is not None:
        evaluations.append(QualitativeEvaluation(CODES["label"], CODES[_LABEL_CODES[answer["label"]]]))
    if answer.get("out_of_distribution") is not None:
        flag = CODES["yes"] if answer["out_of_distribution"] else CODES["no"]
        evaluations.append(QualitativeEvaluation(CODES["ood"], flag))
    p_covid = answer["probabilities"]["COVID-19"]
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=_uid("tracking", source.SOPInstanceUID, identity), identifier="1"),
        finding_type=CODES["covid19"],
        algorithm_id=algorithm,
        finding_sites=[FindingSite(CODES["lung"])],
        measurements=[Measurement(CODES["probability"], p_covid, CODES["unit"])],  # the group names the algorithm
        qualitative_evaluations=evaluations,
        source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
    )
    if answer["no_answer_reason"]:
        reason = TextContentItem(
            CODES["reason"], answer["no_answer_reason"][:1024], relationship_type=RelationshipTypeValues.CONTAINS
        )
        group[0].ContentSequence.append(reason)
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=device),
        procedure_reported=CODES["chest_xray"],
        imaging_measurements=[group],
    )
    sr = ComprehensiveSR(
        evidence=[source],
        content=report[0],
        series_instance_uid=_uid("sr-series", source.StudyInstanceUID, identity),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=_uid("sr", source.SOPInstanceUID, identity),
        instance_number=int(source.get("InstanceNumber") or 1),
        manufacturer="covidxr",
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=identity[:64],
        software_versions=__version__,
        coding_schemes=[CodingSchemeIdentificationItem(SCHEME, name="covidxr", responsible_organization="covidxr")],
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    return sr


def secondary_capture(source: Dataset, pixels: np.ndarray) -> Dataset:
    """The Secondary Capture of an RGB overlay (``pixels``), in ``source``'s study, with its burnt-in line."""
    from highdicom.sc import SCImage

    orientation = source.get("PatientOrientation")
    sc = SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=_uid("sc-series", source.StudyInstanceUID),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=_uid("sc", source.SOPInstanceUID),
        instance_number=int(source.get("InstanceNumber") or 1),
        manufacturer="covidxr",
        patient_orientation=tuple(orientation) if orientation and len(orientation) == 2 else ("R", "F"),
        series_description=SERIES_DESCRIPTION,
        software_versions=__version__,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.BurnedInAnnotation = "YES"
    reference = Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    sc.SourceImageSequence = [reference]  # which image the overlay was made from
    sc.DerivationDescription = "covidxr Grad-CAM overlay of its answer"
    sc.ImageComments = DISCLAIMER
    return sc


def _sc_pixels(image: Image.Image, cam: np.ndarray, answer: dict) -> np.ndarray:
    """The Grad-CAM overlay on the image, at most ``SC_LONG_SIDE`` pixels, with a black band on top holding
    the research-use line and the answer (burnt in: a viewer cannot hide it)."""
    small = image.copy()
    small.thumbnail((SC_LONG_SIDE, SC_LONG_SIDE))
    picture = overlay(small, cam)
    band = max(40, picture.height // 9)
    canvas = Image.new("RGB", (picture.width, picture.height + band), "black")
    canvas.paste(picture, (0, band))
    draw = ImageDraw.Draw(canvas)
    p = answer["probabilities"]["COVID-19"]
    lines = (BURNT_IN, f"covidxr Grad-CAM: {answer['label'] or 'no answer'}, p(COVID-19) {p:.3f}")
    size = band * 0.36
    font = ImageFont.load_default(size=size)
    while max(draw.textlength(line, font=font) for line in lines) > canvas.width - 12 and size > 6:
        size *= 0.9
        font = ImageFont.load_default(size=size)
    for row, line in enumerate(lines):
        draw.text((6, band * (0.28 + 0.45 * row)), line, fill="white", font=font, anchor="lm")
    return np.asarray(canvas, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _read_header(source: Source) -> Dataset:
    """The source's header, without its pixels (decoded separately), for the SR's evidence and references."""
    position = None if isinstance(source, str | Path) else source.tell()
    try:
        header = pydicom.dcmread(source, stop_before_pixels=True)
    except Exception as exc:  # pydicom reports damaged files through many exception types
        raise CovidxrError(f"{source_label(source)}: corrupt or truncated DICOM ({_one_line(exc)})") from None
    finally:
        if position is not None:
            source.seek(position)
    return header


def uid_file_name(uid: str) -> str:
    """A SOP Instance UID as a file name (UIDs are digits and dots; anything else is replaced)."""
    return re.sub(r"[^0-9.]", "_", uid)[:64] or "unnamed"


def _uid(*parts: str) -> str:
    """A UID derived from ``parts``: the same result about the same image always gets the same UID."""
    return generate_uid(entropy_srcs=["covidxr", *map(str, parts)])


def write_whole(ds: Dataset, path: Path) -> None:
    """Write a DICOM file whole or not at all (a crash never leaves half an object for a PACS to take)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(buffer.getvalue())
    partial.replace(path)


def _one_line(exc: BaseException) -> str:
    text = re.sub(r"\s+", " ", str(exc)).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _require_highdicom() -> None:
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise CovidxrError(PACS_EXTRA) from None
