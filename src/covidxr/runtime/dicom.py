"""Reading DICOM radiographs into the 8-bit RGB images the models take.

A hospital's chest X-rays come out of PACS as DICOM, not PNG, and turning one into the picture a
radiologist sees has pitfalls that silently give the network a different image than it was trained on:

* MONOCHROME1 stores bone dark (high values are black); it must be inverted, or the model sees a negative.
* Stored values are not grey levels: a Modality LUT or rescale slope/intercept comes first, then the VOI
  (a VOI LUT, or window centre/width) that the acquisition chose for display.
* 10-16-bit data sits in 16-bit containers; scaling by the container (65535) instead of BitsStored
  leaves a 12-bit image almost black.
* Compressed transfer syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE) need decoder plugins (pylibjpeg and its
  libjpeg / openjpeg / rle plugins); a missing one is named in the error.

The pipeline follows pydicom's documented helpers (``pydicom.pixels.apply_modality_lut`` then
``apply_voi_lut``), as PS3.3 C.11 orders them. Without a VOI the full range that BitsStored allows
(through the modality transform) is used, widened to the data when the header understates it.
``PresentationLUTShape`` is not applied; MONOCHROME1 is inverted once.

Nothing here logs or returns patient data: ``dicom_info`` gives only technical facts (``DicomInfo``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, apply_voi_lut, get_decoder
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from covidxr.runtime.errors import CovidxrError, ImageTooLarge
from covidxr.runtime.source import Source, has_dicom_magic, source_label

__all__ = ["VIEW_REFUSAL", "DicomInfo", "decode_dicom", "dicom_info", "install_hint", "read_dicom", "view_refusal"]

PIXEL_DATA_TAG = 0x7FE00010
VIEW_REFUSAL = "covidxr_view_refusal"  # image.info key: why the header rules out an answer (``view_refusal``)
_LATERAL_VIEWS = {"LL", "RL", "LATERAL", "LAT", "LLD", "RLD"}
_CHEST_PARTS = {"", "CHEST", "THORAX", "LUNG", "PORTABLE CHEST"}
_GREY = {"MONOCHROME1", "MONOCHROME2"}
_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"}
# Elements larger than this are read from the file only when used, so the header can be checked
# (size, frames) before the pixel data is loaded or decoded.
_DEFER_BYTES = "64 KB"
# What to pip install for each family of compressed transfer syntaxes (UID prefix or UID).
_DECODER_PACKAGES = (
    ("1.2.840.10008.1.2.4.8", "pylibjpeg pylibjpeg-libjpeg (JPEG-LS)"),  # .80, .81
    ("1.2.840.10008.1.2.4.9", "pylibjpeg pylibjpeg-openjpeg (JPEG 2000)"),  # .90-.93
    ("1.2.840.10008.1.2.4.20", "pylibjpeg pylibjpeg-openjpeg (HTJ2K)"),  # .201-.203
    ("1.2.840.10008.1.2.4.", "pylibjpeg pylibjpeg-libjpeg (JPEG)"),  # .50, .51, .57, .70
    ("1.2.840.10008.1.2.5", "pylibjpeg pylibjpeg-rle (RLE)"),
)


@dataclass(frozen=True)
class DicomInfo:
    """Technical facts about a DICOM image: no patient, study or institution data, ever."""

    transfer_syntax: str  # name, e.g. "Explicit VR Little Endian", "JPEG 2000 Image Compression"
    modality: str  # CR, DX, ... ("" when absent)
    photometric_interpretation: str
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int  # 0 unsigned, 1 signed
    frames: int
    modality_transform: str  # "rescale", "lut" or "none"
    voi: str  # "window", "lut" or "none" (full BitsStored range); always "none" for colour images
    window_center: float | None  # the window applied (first of several), when voi == "window"
    window_width: float | None
    inverted: bool  # MONOCHROME1, shown inverted so bone is bright

    def to_dict(self) -> dict:
        return asdict(self)


def dicom_info(path: str | Path) -> DicomInfo:
    """The safe technical facts of a DICOM file (header only; the pixels are not decoded)."""
    path = Path(path)
    return _info(_read_header(path), path)


def view_refusal(ds: Dataset) -> str | None:
    """Why the header rules out an answer (a lateral view, or not the chest), or None: the model reads frontal
    chest radiographs only."""
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view in _LATERAL_VIEWS:
        return f"a lateral view (ViewPosition {view}); the model reads frontal chest X-rays"
    part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if part not in _CHEST_PARTS:
        return f"not a chest image (BodyPartExamined {part}); the model reads chest X-rays"
    return None


def read_dicom(source: Source, max_pixels: int | None = None) -> Image.Image:
    """Decode a single-frame DICOM image into 8-bit RGB, as a reading room would display it."""
    return decode_dicom(source, max_pixels)[0]


def decode_dicom(source: Source, max_pixels: int | None = None) -> tuple[Image.Image, DicomInfo]:
    """An 8-bit RGB image and the ``DicomInfo`` of a DICOM file; CovidxrError naming the file otherwise.

    Refuses multi-frame files, files without pixel data and images over ``max_pixels`` (checked on the
    header, before any pixel is read or decoded). A header that rules out an answer (``view_refusal``: a lateral
    view, not the chest) is said in the image's ``info[VIEW_REFUSAL]``, so every route gives it no answer alike.
    """
    ds = _read_header(source)
    path = source_label(source)
    info = _info(ds, path)
    if info.frames > 1:
        raise CovidxrError(f"{path}: DICOM has {info.frames} frames; give one image per file")
    if max_pixels is not None and info.rows * info.columns > max_pixels:
        raise ImageTooLarge(f"{path}: image is {info.columns}x{info.rows} pixels, over the limit of {max_pixels:,}")
    if info.photometric_interpretation not in _GREY | _COLOUR:
        raise CovidxrError(
            f"{path}: DICOM photometric interpretation {info.photometric_interpretation or '(none)'} is not "
            "supported (expected MONOCHROME1, MONOCHROME2 or RGB/YBR)"
        )
    _check_decoder(ds, path)
    grey_image = info.photometric_interpretation in _GREY
    try:
        if grey_image:
            ds.pixel_array_options(correct_unused_bits=False)  # the bits above BitsStored are judged here
        pixels = ds.pixel_array  # YBR is converted to RGB by pydicom
        if grey_image:
            decoded = _grey_to_8bit(_stored_values(np.asarray(pixels), ds, info), ds, info)
        else:
            decoded = _colour_to_8bit(np.asarray(pixels), info)
    except Exception as exc:  # pydicom reports damaged pixel data through many exception types
        raise CovidxrError(f"{path}: corrupt or truncated DICOM pixel data ({_one_line(exc)})") from None
    if decoded.shape[:2] != (info.rows, info.columns):
        raise CovidxrError(
            f"{path}: DICOM pixel data is {decoded.shape[1]}x{decoded.shape[0]}, header says {info.columns}x{info.rows}"
        )
    image = Image.fromarray(np.ascontiguousarray(decoded))
    image = image.convert("RGB") if grey_image else image  # grey to RGB by Pillow: 4x numpy's repeat
    refusal = view_refusal(ds)
    if refusal:
        image.info[VIEW_REFUSAL] = refusal
    return image, info


# ---------------------------------------------------------------------------------------------
# Header
# ---------------------------------------------------------------------------------------------


def _read_header(source: Source) -> Dataset:
    path = source_label(source)
    if isinstance(source, str | Path) and not Path(source).is_file():
        raise CovidxrError(f"{path}: file not found")
    magic = has_dicom_magic(source)
    try:
        # Without the preamble (old ACR-NEMA style files) pydicom must be forced; the checks below
        # then tell a dataset from any other bytes.
        ds = pydicom.dcmread(source, force=not magic, defer_size=_DEFER_BYTES)
        looks_dicom = magic or ("Rows" in ds and "Columns" in ds)
        if looks_dicom:
            _ = ds.get("Rows"), ds.get("Columns"), ds.get("NumberOfFrames"), ds.get("PhotometricInterpretation")
    except Exception as exc:  # pydicom reports damaged files through many exception types
        what = "corrupt or truncated DICOM" if magic else "not a DICOM file or readable image"
        raise CovidxrError(f"{path}: {what} ({_one_line(exc)})") from None
    if not looks_dicom:
        raise CovidxrError(f"{path}: not a DICOM file or readable image")
    if PIXEL_DATA_TAG not in ds:
        raise CovidxrError(f"{path}: DICOM has no pixel data (7FE0,0010); not an image, or a truncated file")
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        if ds.get(keyword) in (None, ""):
            raise CovidxrError(f"{path}: DICOM lacks {keyword}, needed to read its pixels")
    if not ds.get("PhotometricInterpretation") and int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        ds.PhotometricInterpretation = "MONOCHROME2"  # old ACR-NEMA files omit it; grey, black = 0
    if not ds.file_meta.get("TransferSyntaxUID"):
        # A dataset without file meta (no preamble): say how pydicom found it encoded.
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return ds


def _info(ds: Dataset, path: str | Path) -> DicomInfo:
    try:
        photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
        grey = photometric in _GREY
        bits_allocated = int(ds.BitsAllocated)
        voi, center, width = _voi_kind(ds) if grey else ("none", None, None)
        if ds.get("ModalityLUTSequence"):
            modality_transform = "lut"
        elif ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
            modality_transform = "rescale"
        else:
            modality_transform = "none"
        tsyntax = ds.file_meta.get("TransferSyntaxUID")
        return DicomInfo(
            transfer_syntax=tsyntax.name if tsyntax else "",
            modality=str(ds.get("Modality", "") or ""),
            photometric_interpretation=photometric,
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            samples_per_pixel=int(ds.get("SamplesPerPixel", 1) or 1),
            bits_allocated=bits_allocated,
            bits_stored=int(ds.get("BitsStored", bits_allocated) or bits_allocated),
            pixel_representation=int(ds.get("PixelRepresentation", 0) or 0),
            frames=int(ds.get("NumberOfFrames", 1) or 1),
            modality_transform=modality_transform if grey else "none",
            voi=voi,
            window_center=center,
            window_width=width,
            inverted=photometric == "MONOCHROME1",
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise CovidxrError(f"{path}: DICOM header has invalid image attributes ({_one_line(exc)})") from None


def _voi_kind(ds: Dataset) -> tuple[str, float | None, float | None]:
    """Which VOI ``apply_voi_lut`` will apply: a VOI LUT (preferred), the first window, or none."""
    sequence = ds.get("VOILUTSequence")
    if sequence and sequence[0].get("LUTDescriptor") is not None and sequence[0].get("LUTData") is not None:
        return "lut", None, None
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is None or width is None:
        return "none", None, None
    # PS3.3 C.11.2.1.2: width >= 1 (LINEAR, SIGMOID) or > 0 (LINEAR_EXACT); an invalid window is ignored.
    exact = str(ds.get("VOILUTFunction", "LINEAR")).upper() == "LINEAR_EXACT"
    if width <= 0 or (width < 1 and not exact):
        return "none", None, None
    return "window", center, width


def _first(value: object) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, list | tuple | MultiValue):
        value = value[0] if len(value) else None
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _check_decoder(ds: Dataset, path: str | Path) -> None:
    tsyntax = ds.file_meta.get("TransferSyntaxUID")
    if not tsyntax or not tsyntax.is_compressed:
        return
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise CovidxrError(f"{path}: DICOM transfer syntax {tsyntax.name} ({tsyntax}) cannot be decoded") from None
    if not decoder.is_available:
        raise CovidxrError(
            f"{path}: no decoder for DICOM transfer syntax {tsyntax.name}; install one with "
            f"`pip install {install_hint(tsyntax)}`"
        )


def install_hint(transfer_syntax_uid: str) -> str:
    """The pip packages that decode a compressed transfer syntax (for the missing-decoder error)."""
    for prefix, packages in _DECODER_PACKAGES:
        if str(transfer_syntax_uid).startswith(prefix):
            return packages
    return "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle"


# ---------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------


# Integer pixels spanning at most this many values are mapped through a table of their range (``_grey_to_8bit``).
TABLE_SPAN = 1 << 17


def _grey_to_8bit(stored: np.ndarray, ds: Dataset, info: DicomInfo) -> np.ndarray:
    """The display's 8-bit grey levels of a grey image's stored values (modality and VOI transforms, range,
    inversion). Every step maps one value to one value, so integer pixels of a modest span go through a table built
    by the same steps on each value present (a 3000 x 2500 12-bit film: a few thousand values, not 7.5 million):
    the same bytes as mapping every pixel, several times faster."""
    if stored.ndim != 2:
        raise ValueError(f"grey image with shape {stored.shape}")
    if stored.dtype.kind in "iu" and stored.size:
        low, high = int(stored.min()), int(stored.max())
        if high - low < min(TABLE_SPAN, stored.size):
            # unsigned: the offsets in the pixels' own type (no copy at all where the lowest value is 0)
            offsets = (stored - stored.dtype.type(low) if low else stored) if stored.dtype.kind == "u" else None
            if offsets is None:
                offsets = stored.astype(np.int32) - np.int32(low)
            present = np.zeros(high - low + 1, dtype=bool)
            present[offsets] = True
            # 64-bit values, as the stored values of any integer type always reach the transforms' float64 exactly
            domain = np.arange(low, high + 1, dtype=np.int64)[present][None]
            table = np.zeros(high - low + 1, dtype=np.uint8)
            table[present] = _grey_levels(domain, ds, info)[0]
            return table[offsets]
    return _grey_levels(stored, ds, info)


def _grey_levels(stored: np.ndarray, ds: Dataset, info: DicomInfo) -> np.ndarray:
    """``_grey_to_8bit`` pixel by pixel: ``stored`` holds every value whose level is wanted (the range of a
    window-less image is widened to the values it holds)."""
    values = apply_modality_lut(stored, ds)
    if info.voi == "lut":
        table, first = _voi_lut_table(ds)
        out = table[np.clip(np.rint(values).astype(np.int64) - first, 0, len(table) - 1)]
        lo, hi = float(table.min()), float(table.max())
    elif info.voi == "window":
        out = apply_voi_lut(values, ds, index=0, prefer_lut=False)
        lo, hi = _window_output_range(ds)
    else:
        # No window given: the range BitsStored allows (stored values keep their meaning), widened
        # where the data goes beyond it.
        out = values
        lo, hi = _modality_output_range(ds, info)
        lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
    out = np.asarray(out, dtype=np.float64)
    scaled = (out - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(out)
    grey = np.rint(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)
    return 255 - grey if info.inverted else grey


def _colour_to_8bit(rgb: np.ndarray, info: DicomInfo) -> np.ndarray:
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"colour image with shape {rgb.shape}")
    if rgb.dtype == np.uint8 and info.bits_stored <= 8:
        return rgb
    top = float(2**info.bits_stored - 1)
    return np.rint(np.clip(rgb.astype(np.float64) / top * 255.0, 0.0, 255.0)).astype(np.uint8)


def _stored_range(info: DicomInfo) -> tuple[int, int]:
    if info.pixel_representation == 1:
        return -(2 ** (info.bits_stored - 1)), 2 ** (info.bits_stored - 1) - 1
    return 0, 2**info.bits_stored - 1


def _modality_output_range(ds: Dataset, info: DicomInfo) -> tuple[float, float]:
    """The range of modality values that BitsStored allows: the stored range through the modality transform."""
    lo, hi = _stored_range(info)
    domain = np.arange(lo, hi + 1) if hi - lo <= 2**16 else np.array([lo, hi])
    mapped = np.asarray(apply_modality_lut(domain, ds), dtype=np.float64)
    return float(mapped.min()), float(mapped.max())


def _window_output_range(ds: Dataset) -> tuple[float, float]:
    """The output range of ``pydicom.pixels.apply_windowing`` (as it computes it, PS3.3 C.11.2.1.2)."""
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0) or 0) == 0:
        lo, hi = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        lo, hi = float(-(2 ** (int(ds.BitsStored) - 1))), float(2 ** (int(ds.BitsStored) - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return min(lo, hi), max(lo, hi)


def _voi_lut_table(ds: Dataset) -> tuple[np.ndarray, int]:
    """The first VOI LUT as a table, and the first value it maps; the display range is the values the
    table holds (its nominal bit depth is often wrong in practice, so its data decides).

    pydicom 3.0.2's ``apply_voi`` indexes a LUT of 8-bit entries with a uint8 array, so every input
    past 255 wraps around and scrambles the image. The table is read through it with its entries
    declared 16-bit (the same numbers, indexed with uint16) and indexed here with 64-bit integers."""
    element = ds.VOILUTSequence[0]["LUTDescriptor"]
    declared = element.value
    entries, first, depth = (int(v) for v in declared)
    entries = entries or 2**16
    try:
        if depth == 8:
            element.value = [entries % 2**16, first, 16]
        table = np.asarray(apply_voi(np.arange(first, first + entries), ds, 0), dtype=np.float64)
    finally:
        element.value = declared
    return table, first


def _stored_values(raw: np.ndarray, ds: Dataset, info: DicomInfo) -> np.ndarray:
    """The stored values of a grey image, read without pydicom's masking of the bits above BitsStored.

    Those bits are masked (sign-extended for signed data) only where they are clear anyway or the
    header declares overlays embedded in them (60xx,0102 without Overlay Data); a header whose
    BitsStored merely understates the data keeps every bit, and the display range is widened to the
    data, instead of cutting off the high bits and scrambling the picture."""
    bits = info.bits_stored
    if bits >= info.bits_allocated:
        return raw
    if info.pixel_representation == 0 and raw.dtype.kind == "u" and not (raw >> bits).any():
        return raw  # nothing above BitsStored: masking would give these very values (no 64-bit copy of the film)
    values = raw.astype(np.int64)
    low = values & ((1 << bits) - 1)
    if info.pixel_representation == 1:
        low = np.where(low >= 1 << (bits - 1), low - (1 << bits), low)
    if np.array_equal(low, values) or _embedded_overlays(ds):
        return low
    return values


def _embedded_overlays(ds: Dataset) -> bool:
    """Whether an overlay lives in the unused high bits of the pixels (retired, but old files have it)."""
    return any((group << 16 | 0x0102) in ds and (group << 16 | 0x3000) not in ds for group in range(0x6000, 0x6020, 2))


def _one_line(exc: BaseException) -> str:
    text = re.sub(r"\s+", " ", str(exc)).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
