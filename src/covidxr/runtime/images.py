"""Decoding: any image file or upload (PNG, JPEG, TIFF, BMP, DICOM) into 8-bit RGB, with one clear error.

Part of the runtime layer: numpy, Pillow and pydicom only, so prediction needs nothing from training.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from covidxr.runtime.errors import CovidxrError, ImageTooLarge
from covidxr.runtime.source import DICOM_SUFFIXES, Source, has_dicom_magic, source_label

__all__ = [
    "ImageLike",
    "SINGLE_IMAGE",
    "as_image",
    "from_array",
    "from_pil",
    "single_answer",
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "MIN_IMAGE_SIDE",
    "check_dimensions",
    "decode_bytes",
    "file_sha256",
    "image_facts",
    "read_image",
    "unreadable_reason",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}
# Larger than any radiograph (a 43x43 cm detector at 0.1 mm is ~18 Mpx); bigger files are refused.
MAX_IMAGE_PIXELS = 60_000_000
MIN_IMAGE_SIDE = 32  # a 1x1 or thumbnail "image" carries no anatomy to classify
# Beyond any radiograph: a PNG/TIFF/BMP this large is reduced after decoding where a ``draft`` side is given.
REDUCE_ABOVE = 20_000_000


FULL_SIZE = "covidxr_full_size"  # image.info key: the file's own width and height
BIT_DEPTH = "covidxr_bit_depth"  # image.info key: the file's bits per sample (DICOM: BitsStored)
SOURCE_MODE = "covidxr_mode"  # image.info key: the file's own mode (Pillow's; DICOM: its photometric interpretation)
# Bits per sample of Pillow's modes (a 16-bit PNG or TIFF opens as I;16, a 32-bit one as I or F).
_MODE_BITS = {"1": 1, "I": 32, "F": 32, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16}


def read_image(path: str | Path, draft: int | None = None) -> Image.Image:
    """Decode an image file into 8-bit RGB (see ``_decode``); refuse images too small to be a radiograph.

    The file is opened once (``_open_image``) and decoded from that descriptor, so a file swapped for a pipe
    after it was checked is never read by name.

    ``draft``: a JPEG is decoded at 1/2, 1/4 or 1/8 scale where both sides stay at least this many
    pixels (Pillow's ``draft``: the decoder skips the detail, several times faster on a large film);
    a PNG, TIFF or BMP over ``REDUCE_ABOVE`` pixels is reduced the same way right after decoding."""
    path = Path(path)
    handle, problem = _open_image(path)
    if handle is None:
        raise CovidxrError(f"{path}: {problem}")
    with handle:
        return _checked_size(_decode(handle, path.suffix.lower(), draft), path)


def unreadable_reason(path: Path) -> str | None:
    """Why ``path`` cannot be read as an image file, in words a user can act on (permission denied, a
    broken symlink, a symlink loop, a folder, a pipe, an empty file), or None when it can be opened.

    Checked before decoding, so a file the system refuses is never reported as a corrupt image."""
    handle, problem = _open_image(path)
    if handle is not None:
        handle.close()
    return problem


def _open_image(path: Path) -> tuple[BinaryIO | None, str | None]:
    """``path`` opened for reading, or why it cannot be. Opened without blocking (``O_NONBLOCK``: a pipe with no
    writer would wait for ever) and checked after opening (``fstat``: what was opened, not what a name
    pointed at a moment before), so a pipe, device or socket is refused however it got there."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        return None, "broken symlink (its target does not exist)" if path.is_symlink() else "file not found"
    except PermissionError:
        return None, "permission denied" + (" (a folder that cannot be listed)" if path.is_dir() else "")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None, "symlink loop (the link points back at itself)"
        return None, f"cannot be read ({exc.strerror or type(exc).__name__})"
    raw = io.FileIO(descriptor, "rb")
    raw.name = str(path)  # how messages and pydicom name it
    try:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(mode):
            os.listdir(path)
            problem = "is a folder, not an image file"
        elif not stat.S_ISREG(mode):
            problem = "not a regular file (a device, pipe or socket)"
        else:
            problem = None if raw.read(1) else "empty file"
            raw.seek(0)
    except PermissionError:
        problem = "permission denied (a folder that cannot be listed)"
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror or type(exc).__name__})"
    if problem:
        raw.close()
        return None, problem
    return io.BufferedReader(raw), None


def decode_bytes(data: bytes, name: str = "upload", draft: int | None = None) -> Image.Image:
    """Decode an image held in memory (an upload) exactly as ``read_image`` decodes a file, without
    writing it anywhere; ``name`` labels the error messages."""
    if not data:
        raise CovidxrError(f"{name}: empty file")
    buffer = io.BytesIO(data)
    buffer.name = name
    return _checked_size(_decode(buffer, Path(name).suffix.lower(), draft), name)


def check_dimensions(width: int, height: int, name: str | Path) -> None:
    """Refuse an image too small to hold anatomy, or over the pixel limit (``ImageTooLarge``): the
    same limits for files, uploads and in-memory images."""
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(f"{name}: image is {width}x{height} pixels, over the limit of {MAX_IMAGE_PIXELS:,}")
    if min(width, height) < MIN_IMAGE_SIDE:
        raise CovidxrError(
            f"{name}: {width}x{height} pixels is too small to be a chest radiograph "
            f"(at least {MIN_IMAGE_SIDE} pixels a side)"
        )


def _checked_size(image: Image.Image, path: str | Path) -> Image.Image:
    check_dimensions(image.width, image.height, path)
    return image


def _decode(source: Source, suffix: str, draft: int | None = None) -> Image.Image:
    """Decode a file (or an in-memory buffer) into 8-bit RGB, whatever its mode (16-bit, RGBA, palette,
    grey) or DICOM.

    High-bit-depth images are scaled by their own range, so 12-bit data in a 16-bit container
    keeps its contrast. DICOM is recognised by its content (``DICM`` after the preamble), or by a
    ``.dcm``/``.dicom`` name (``suffix``) when no other image format matches, and decoded by
    ``covidxr.runtime.dicom`` (modality and VOI transforms, MONOCHROME1 inverted). Raises CovidxrError naming
    the file for anything that is not a readable, complete image (ImageTooLarge over the pixel limit).
    """
    path = source_label(source)
    if has_dicom_magic(source):
        return _read_dicom(source)
    try:
        with Image.open(source) as img:
            return from_pil(img, path, draft)
    except CovidxrError:
        raise
    except UnidentifiedImageError as exc:
        if suffix not in DICOM_SUFFIXES:
            raise CovidxrError(f"{path}: not a readable image ({type(exc).__name__})") from None
    except Image.DecompressionBombError:
        raise ImageTooLarge(
            f"{path}: image is over the limit of {MAX_IMAGE_PIXELS:,} pixels (refused before decoding: "
            "a decompression bomb or not a radiograph)"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise CovidxrError(f"{path}: corrupt or truncated image ({exc})") from None
    # A .dcm/.dicom file that no image format recognised: a DICOM without preamble, or not an image at all.
    if not isinstance(source, str | Path):
        source.seek(0)
    return _read_dicom(source)


def from_pil(img: Image.Image, name: str | Path, draft: int | None = None) -> Image.Image:
    """A PIL image (opened from a file, an upload, or given by a caller) as 8-bit RGB, with the checks every route
    shares: the pixel limit, one frame only, a complete decode, EXIF orientation, high bit depths scaled by their
    own range, transparency onto black. Errors name ``name``; a truncated or lazily loaded file that fails to
    decode raises ``CovidxrError``, never Pillow's ``OSError``."""
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(f"{name}: image is {img.width}x{img.height} pixels, over the limit of {MAX_IMAGE_PIXELS:,}")
    full_size = img.size
    if draft and img.format == "JPEG":
        img.draft(img.mode, (draft, draft))
    if getattr(img, "n_frames", 1) > 1:
        what = "pages" if img.format == "TIFF" else "frames"
        raise CovidxrError(f"{name}: has {img.n_frames} {what}; give one image per file")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise CovidxrError(f"{name}: corrupt or truncated image ({exc})") from None
    turned = img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)  # a quarter turn
    mode = img.mode
    upright = _upright(img)
    if draft and img.format != "JPEG" and img.width * img.height > REDUCE_ABOVE:
        upright = _reduced(upright, draft)  # a huge PNG/TIFF/BMP: memory follows the model's size, not the file's
    decoded = _to_rgb8(upright, name)
    decoded.info[FULL_SIZE] = full_size[::-1] if turned else full_size  # before any draft reduction
    decoded.info[BIT_DEPTH], decoded.info[SOURCE_MODE] = _MODE_BITS.get(mode, 8), mode
    return _checked_size(decoded, name)


def _read_dicom(source: Source) -> Image.Image:
    from covidxr.runtime import dicom  # pydicom takes ~0.1 s to import: only when a DICOM comes

    image, info = dicom.decode_dicom(source, max_pixels=MAX_IMAGE_PIXELS)
    image.info[FULL_SIZE] = (info.columns, info.rows)
    image.info[BIT_DEPTH], image.info[SOURCE_MODE] = info.bits_stored, info.photometric_interpretation
    return image


def image_facts(image: Image.Image) -> dict:
    """What the file held before decoding to 8-bit RGB, for monitoring a site's inputs: its own ``width`` and
    ``height`` (before any draft reduction), ``bit_depth`` (bits per sample; DICOM: BitsStored) and ``mode``
    (Pillow's, e.g. ``L``, ``RGB``, ``I;16``; DICOM: the photometric interpretation, e.g. ``MONOCHROME2``).
    An image that was not decoded from a file (the Python API's arrays) gives its own size, 8 bits and its mode."""
    width, height = image.info.get(FULL_SIZE, image.size)
    return {
        "width": int(width),
        "height": int(height),
        "bit_depth": int(image.info.get(BIT_DEPTH, 8)),
        "mode": str(image.info.get(SOURCE_MODE, image.mode)),
    }


def _reduced(img: Image.Image, side: int) -> Image.Image:
    """A huge PNG, TIFF or BMP averaged down by the whole factor that keeps both sides at least ``side``
    pixels (what JPEG's draft does while decoding), before its conversion to RGB: the copies made after
    decoding then cost a fraction of the pixels (palette and 1-bit images are converted whole)."""
    factor = min(img.size) // side
    if factor < 2 or img.mode in {"1", "P"}:
        return img
    return (img.convert("I") if img.mode.startswith("I;16") else img).reduce(factor)


def _upright(img: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: rotated or flipped as its EXIF orientation says (a phone
    photo of a film, a scanner's rotated JPEG), so the model never sees it sideways."""
    if img.getexif().get(ExifTags.Base.Orientation, 1) in (None, 1):
        return img
    return ImageOps.exif_transpose(img)


def _to_rgb8(img: Image.Image, path: str | Path) -> Image.Image:
    if img.mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
        arr = np.asarray(img, dtype=np.float64)
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))  # a float TIFF's NaN would make it all "blank"
        if bad:
            raise CovidxrError(f"{path}: not a finite image ({bad} of its {arr.size:,} pixels are NaN or infinite)")
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
    if img.mode in {"RGBA", "LA", "PA"} or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become black, the usual background of a radiograph.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def file_sha256(path: str | Path) -> str:
    """Content hash of a file: the identity of an image for de-duplication and the feature cache."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


ImageLike = str | Path | bytes | Image.Image | np.ndarray
SINGLE_IMAGE = (str, Path, bytes, Image.Image, np.ndarray)  # one image; anything else is a sequence of them


def as_image(item: ImageLike) -> Image.Image:
    """One image of any kind the API takes, decoded as files are (``from_pil``): a path, the bytes of a file, a
    PIL image, or an array (``from_array``); every kind is held to the same limits and checks."""
    if isinstance(item, str | Path):
        return read_image(item)
    if isinstance(item, bytes):
        return decode_bytes(item, "image bytes")
    if isinstance(item, Image.Image):
        return from_pil(item, f"PIL image ({item.width}x{item.height}, {item.mode})")
    return from_array(item)


def from_array(item: np.ndarray) -> Image.Image:
    """An image array as 8-bit RGB: HxW, HxWx1, HxWx3 or HxWx4 (RGBA); uint8 as it is, other integers (16-bit)
    scaled by their own range as a 16-bit file is, floats taken as intensities in [0, 1] (so an 8-bit image
    divided by 255 gives the same answer). Anything else is refused in one line."""
    array = np.asarray(item)
    name = f"image array {array.dtype} {array.shape}"
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise CovidxrError(f"{name}: an image array must be HxW, HxWx1, HxWx3 or HxWx4")
    if array.size == 0:
        raise CovidxrError(f"{name}: empty")
    check_dimensions(array.shape[1], array.shape[0], name)
    if array.dtype == np.uint8:
        return from_pil(Image.fromarray(array), name)
    if np.issubdtype(array.dtype, np.floating):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise CovidxrError(f"{name}: not a finite image ({bad} of its {array.size:,} values are NaN or infinite)")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise CovidxrError(f"{name}: float images must hold intensities in [0, 1], not [{low:.4g}, {high:.4g}]")
        return from_pil(Image.fromarray(np.round(array * 255.0).astype(np.uint8)), name)
    if np.issubdtype(array.dtype, np.integer) and not np.issubdtype(array.dtype, np.bool_):
        if array.ndim == 2:  # as a 16-bit grey PNG decodes: Pillow's I;16 (or I, for wider integers)
            fits = array.min() >= 0 and array.max() <= np.iinfo(np.uint16).max
            return from_pil(Image.fromarray(array.astype(np.uint16 if fits else np.int32)), name)
        low, high = float(array.min()), float(array.max())
        scaled = (array.astype(np.float64) - low) / (high - low) * 255.0 if high > low else np.zeros(array.shape)
        return from_pil(Image.fromarray(np.round(scaled).astype(np.uint8)), name)
    raise CovidxrError(f"{name}: an image array must hold integers (uint8, 16-bit) or floats in [0, 1]")


def single_answer(results: list[dict]) -> dict:
    """The one answer ``predict`` gave for a single image: an image it could not read raises its error instead
    of returning a row (a list of images keeps such rows)."""
    [result] = results
    if "error" in result:
        raise CovidxrError(result["error"])
    return result
