"""DICOM input: real chest X-rays written as DICOM by pydicom, read back through ``read_image``.

Every case compares against the source radiograph or against the DICOM rule computed by hand; no mocks.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    MPEG2MPML,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from covidxr.lab.models import create_model
from covidxr.runtime.dicom import DicomInfo, decode_dicom, dicom_info, install_hint
from covidxr.runtime.errors import CovidxrError
from covidxr.runtime.images import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, read_image
from tests.conftest import CXR3

PATIENT = {"PatientName": "Doe^Jane", "PatientID": "MRN-7731904", "PatientBirthDate": "19580214"}


# ---------------------------------------------------------------------------------------------
# Real images and a minimal DX writer
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources() -> list[Path]:
    """Two real radiographs (one COVID-19, one NORMAL), grey baseline JPEGs as the dataset holds them."""
    meta = pd.read_csv(CXR3 / "metadata.csv", dtype=str, keep_default_na=False)
    if meta.empty:
        pytest.fail(f"no images listed in {CXR3 / 'metadata.csv'}")
    return [CXR3 / meta[meta["label"] == label]["filename"].iloc[0] for label in ("COVID-19", "NORMAL")]


@pytest.fixture(scope="module")
def source(sources: list[Path]) -> Path:
    return sources[0]


def grey(path: Path) -> np.ndarray:
    """The source's grey values as the PNG/JPEG path reads them."""
    return np.asarray(read_image(path).convert("L"))


def to_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """8-bit grey values spread over ``bits`` stored bits (so scaling back gives the same values)."""
    if bits == 8:
        return values.astype(np.uint8)
    return np.rint(values.astype(np.float64) * (2**bits - 1) / 255.0).astype(np.uint16)


def dx_dataset(pixels: np.ndarray, bits_stored: int, photometric: str = "MONOCHROME2", **attrs: object) -> Dataset:
    """A minimal valid DX For Presentation dataset around ``pixels`` (with patient tags to keep private)."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def decoded_grey(path: Path) -> np.ndarray:
    rgb = np.asarray(read_image(path))
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()
    return rgb[..., 0]


def diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    assert a.shape == b.shape
    return np.abs(a.astype(np.int64) - b.astype(np.int64))


# ---------------------------------------------------------------------------------------------
# Bit depths, MONOCHROME1, VOI
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_bit_depths_decode_to_the_source_grey_values(source: Path, tmp_path: Path, bits: int) -> None:
    expected = grey(source)
    path = save(dx_dataset(to_bits(expected, bits), bits), tmp_path / f"dx{bits}.dcm")
    error = diff(decoded_grey(path), expected)
    assert error.mean() <= 2 and error.max() <= 1
    info = dicom_info(path)
    assert (info.bits_stored, info.voi, info.inverted) == (bits, "none", False)
    assert (info.rows, info.columns) == expected.shape


def test_twelve_bit_data_is_scaled_by_bits_stored_not_by_the_container(source: Path, tmp_path: Path) -> None:
    """Scaled by 65535, 12-bit data would be a nearly black image (max 16 of 255)."""
    expected = grey(source)
    decoded = decoded_grey(save(dx_dataset(to_bits(expected, 12), 12), tmp_path / "dx12.dcm"))
    assert decoded.max() == expected.max() and decoded.std() == pytest.approx(expected.std(), rel=0.01)


@pytest.mark.parametrize("bits", [8, 12])
def test_monochrome1_decodes_to_the_same_picture_as_monochrome2(source: Path, tmp_path: Path, bits: int) -> None:
    expected = grey(source)
    stored = (2**bits - 1) - to_bits(expected, bits).astype(np.int64)
    ds = dx_dataset(stored.astype(np.uint8 if bits == 8 else np.uint16), bits, "MONOCHROME1")
    path = save(ds, tmp_path / "m1.dcm")
    assert diff(decoded_grey(path), expected).max() <= 1
    assert dicom_info(path).inverted


def windowed(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR windowing to 0-255, written out by hand."""
    x = values.astype(np.float64)
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    y = np.where(x <= low, 0.0, np.where(x > high, 255.0, y))
    return np.rint(y).astype(np.uint8)


def test_first_window_is_applied_as_the_standard_defines(source: Path, tmp_path: Path) -> None:
    stored = to_bits(grey(source), 12)
    ds = dx_dataset(stored, 12, WindowCenter=[1800, 3000], WindowWidth=[1600, 400])
    path = save(ds, tmp_path / "window.dcm")
    expected = windowed(stored, 1800, 1600)
    assert diff(decoded_grey(path), expected).max() <= 1
    assert (expected == 0).any() and (expected == 255).any(), "the window must clip some real pixels"
    info = dicom_info(path)
    assert (info.voi, info.window_center, info.window_width) == ("window", 1800.0, 1600.0)


def test_monochrome1_window_is_inverted_after_windowing(source: Path, tmp_path: Path) -> None:
    stored = 4095 - to_bits(grey(source), 12)
    ds = dx_dataset(stored.astype(np.uint16), 12, "MONOCHROME1", WindowCenter=2200, WindowWidth=1800)
    decoded = decoded_grey(save(ds, tmp_path / "m1-window.dcm"))
    assert diff(decoded, 255 - windowed(stored, 2200, 1800)).max() <= 1


def test_rescale_slope_and_intercept_come_before_the_window(source: Path, tmp_path: Path) -> None:
    stored = to_bits(grey(source), 12)
    slope, intercept = 2.0, -1024.0
    modality = stored.astype(np.float64) * slope + intercept  # e.g. 0-4095 stored -> -1024-7166
    ds = dx_dataset(stored, 12, RescaleSlope=slope, RescaleIntercept=intercept, WindowCenter=2000, WindowWidth=5000)
    path = save(ds, tmp_path / "rescale-window.dcm")
    assert diff(decoded_grey(path), windowed(modality, 2000, 5000)).max() <= 1
    assert dicom_info(path).modality_transform == "rescale"
    # Without a window the full rescaled range is shown: the same picture as the stored values.
    plain = save(dx_dataset(stored, 12, RescaleSlope=slope, RescaleIntercept=intercept), tmp_path / "rescale.dcm")
    assert diff(decoded_grey(plain), grey(source)).max() <= 1


def test_signed_pixels_use_the_signed_bits_stored_range(source: Path, tmp_path: Path) -> None:
    stored = (to_bits(grey(source), 12).astype(np.int16) - 2048).astype(np.int16)  # -2048..2047
    ds = dx_dataset(stored, 12, PixelRepresentation=1)
    assert diff(decoded_grey(save(ds, tmp_path / "signed.dcm")), grey(source)).max() <= 1
    ds.WindowCenter, ds.WindowWidth = 0, 2000
    assert diff(decoded_grey(save(ds, tmp_path / "signed-window.dcm")), windowed(stored, 0, 2000)).max() <= 1


def test_voi_lut_sequence_is_preferred_to_the_window(source: Path, tmp_path: Path) -> None:
    stored = to_bits(grey(source), 12)
    table = np.rint(4095 * (np.arange(4096) / 4095) ** 0.6).astype(np.uint16)  # a gamma-like VOI LUT
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 12])  # LUTDescriptor: entries, first mapped value, bits
    item.add_new(0x00283006, "US", table.tolist())  # LUTData
    ds = dx_dataset(stored, 12, VOILUTSequence=Sequence([item]), WindowCenter=100, WindowWidth=10)
    path = save(ds, tmp_path / "voi-lut.dcm")
    expected = np.rint(table[stored] / 4095 * 255).astype(np.uint8)
    assert diff(decoded_grey(path), expected).max() <= 1
    assert dicom_info(path).voi == "lut"


def test_rgb_dicom_is_read_as_rgb(source: Path, tmp_path: Path) -> None:
    g = grey(source).astype(np.float64)
    rgb = np.stack([g, g * 0.8, 255 - g], axis=2).astype(np.uint8)
    path = save(dx_dataset(rgb, 8, "RGB"), tmp_path / "rgb.dcm")
    assert (np.asarray(read_image(path)) == rgb).all()


def test_ybr_jpeg_dicom_is_converted_to_rgb(source: Path, tmp_path: Path) -> None:
    g = grey(source).astype(np.float64)
    rgb = np.stack([g, g * 0.8, 255 - g], axis=2).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)  # YCbCr 4:2:0 baseline
    ds = dx_dataset(rgb, 8, "YBR_FULL_422")
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    path = save(ds, tmp_path / "ybr.dcm")
    reference = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    assert diff(np.asarray(read_image(path)), reference).mean() <= 2


# ---------------------------------------------------------------------------------------------
# Compressed transfer syntaxes (decoded by the pylibjpeg plugins or pydicom's own RLE)
# ---------------------------------------------------------------------------------------------


def require_encoder(uid: str) -> None:
    encoder = get_encoder(uid)
    if not encoder.is_available:
        pytest.skip(f"no {uid.name} encoder installed here ({'; '.join(encoder.missing_dependencies)})")


@pytest.mark.parametrize("uid", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000-lossless"])
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_lossless_compressed_dicoms_decode_exactly(source: Path, tmp_path: Path, uid: str, bits: int) -> None:
    require_encoder(uid)
    expected = grey(source)
    ds = dx_dataset(to_bits(expected, bits), bits)
    ds.compress(uid)
    path = save(ds, tmp_path / "compressed.dcm")
    assert dicom_info(path).transfer_syntax == uid.name
    assert diff(decoded_grey(path), expected).max() <= 1


def test_lossy_jpeg2000_dicom_stays_close(source: Path, tmp_path: Path) -> None:
    require_encoder(JPEG2000)
    expected = grey(source)
    ds = dx_dataset(to_bits(expected, 12), 12)
    ds.compress(JPEG2000, j2k_psnr=[50])
    path = save(ds, tmp_path / "j2k-lossy.dcm")
    assert diff(decoded_grey(path), expected).mean() <= 2


def jpeg_baseline_dicom(source: Path, path: Path) -> Path:
    """The real JPEG's own bytes wrapped as a JPEG Baseline DICOM, as a PACS export would hold it."""
    expected = grey(source)
    ds = dx_dataset(expected, 8)
    ds.PixelData = encapsulate([source.read_bytes()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    return save(ds, path)


def test_jpeg_baseline_dicom_matches_the_jpeg_decoded_directly(source: Path, tmp_path: Path) -> None:
    path = jpeg_baseline_dicom(source, tmp_path / "jpeg.dcm")
    error = diff(decoded_grey(path), grey(source))
    assert error.mean() <= 2 and error.max() <= 2  # two JPEG decoders may round a few pixels differently


def test_undecodable_transfer_syntax_is_refused_clearly(source: Path, tmp_path: Path) -> None:
    ds = dx_dataset(grey(source), 8)
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    path = save(ds, tmp_path / "video.dcm")
    with pytest.raises(CovidxrError, match="cannot be decoded") as caught:
        read_image(path)
    assert one_line_naming(caught.value, path)


def test_missing_decoder_error_names_the_package() -> None:
    assert "pylibjpeg-openjpeg" in install_hint(JPEG2000Lossless)
    assert "pylibjpeg-libjpeg" in install_hint(JPEGBaseline8Bit)
    assert "pylibjpeg-libjpeg" in install_hint("1.2.840.10008.1.2.4.80")  # JPEG-LS
    assert "pylibjpeg-rle" in install_hint(RLELossless)


# ---------------------------------------------------------------------------------------------
# A real model sees the same picture
# ---------------------------------------------------------------------------------------------


def test_model_features_and_probabilities_agree_with_the_source_image(sources: list[Path], tmp_path: Path) -> None:
    model = create_model("efficientnet_lite0", image_size=224, seed=0)  # real pip weights, head seeded
    source, other = sources
    expected = grey(source)
    files = {"source": source, "other": other, "jpeg": jpeg_baseline_dicom(source, tmp_path / "jpeg.dcm")}
    for bits in (8, 12, 16):
        files[f"dx{bits}"] = save(dx_dataset(to_bits(expected, bits), bits), tmp_path / f"dx{bits}.dcm")
    inverted = (4095 - to_bits(expected, 12).astype(np.int64)).astype(np.uint16)
    files["monochrome1"] = save(dx_dataset(inverted, 12, "MONOCHROME1"), tmp_path / "m1.dcm")
    batch = torch.stack([model.input_tensor(read_image(path)) for path in files.values()])
    with torch.no_grad():
        features = model.features(batch)
        head = torch.softmax(model.head(features), dim=1)  # the 3-class head (random, seed 0)
        imagenet = torch.softmax(model.backbone.classify(batch), dim=1)  # the pretrained 1000-class head
    names = list(files)
    relative = [float((f - features[0]).norm() / features[0].norm()) for f in features]
    for name in ("dx8", "dx12", "dx16", "monochrome1", "jpeg"):
        i = names.index(name)
        # Lossless DICOMs hold the very same pixels; the JPEG is decoded by another library (±1 grey level).
        assert relative[i] <= (0.05 if name == "jpeg" else 0.01), (name, relative[i])
        assert (head[i] - head[0]).abs().max() <= 0.02, name
        assert (imagenet[i] - imagenet[0]).abs().max() <= 0.02, name
    # The tolerances are meaningful: another radiograph is far further away.
    other = names.index("other")
    assert relative[other] > 0.5 and (imagenet[other] - imagenet[0]).abs().max() > 0.05


# ---------------------------------------------------------------------------------------------
# Detection by content, and files that must be refused
# ---------------------------------------------------------------------------------------------


def one_line_naming(error: BaseException, path: Path) -> bool:
    message = str(error)
    return "\n" not in message and message.startswith(str(path))


def test_a_dicom_named_png_is_read_as_dicom(source: Path, tmp_path: Path) -> None:
    dicom_file = save(dx_dataset(to_bits(grey(source), 12), 12), tmp_path / "dx.dcm")
    disguised = tmp_path / "chest.png"
    shutil.copy(dicom_file, disguised)
    assert diff(decoded_grey(disguised), grey(source)).max() <= 1


def test_a_png_named_dcm_is_read_as_png(source: Path, tmp_path: Path) -> None:
    disguised = tmp_path / "chest.dcm"
    Image.fromarray(grey(source)).save(disguised, format="PNG")
    assert diff(decoded_grey(disguised), grey(source)).max() == 0


def test_a_dicom_without_preamble_is_read_when_named_dcm(source: Path, tmp_path: Path) -> None:
    """Old ACR-NEMA-style files: no 128-byte preamble, no ``DICM``, no file meta; implicit VR."""
    ds = dx_dataset(to_bits(grey(source), 12), 12)
    ds.file_meta = FileMetaDataset()
    path = tmp_path / "old.dcm"
    ds.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    assert diff(decoded_grey(path), grey(source)).max() <= 1


def multi_frame(source: Path, path: Path) -> Path:
    frame = grey(source)
    ds = dx_dataset(np.concatenate([frame, 255 - frame]), 8, NumberOfFrames=2)
    ds.Rows = frame.shape[0]
    return save(ds, path)


def no_pixel_data(source: Path, path: Path) -> Path:
    ds = dx_dataset(grey(source), 8)
    del ds.PixelData
    return save(ds, path)


def text_file(source: Path, path: Path) -> Path:
    path.write_text("PatientName,PatientID\nnot,an image\n" * 20)
    return path


def truncated_in_pixels(source: Path, path: Path) -> Path:
    save(dx_dataset(to_bits(grey(source), 12), 12), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def truncated_in_header(source: Path, path: Path) -> Path:
    save(dx_dataset(to_bits(grey(source), 12), 12), path)
    path.write_bytes(path.read_bytes()[:400])
    return path


def over_the_size_limit(source: Path, path: Path) -> Path:
    """A header claiming 20000x20000 pixels (over MAX_IMAGE_PIXELS) with only 16 real ones."""
    ds = dx_dataset(grey(source)[:4, :4], 8)
    ds.Rows, ds.Columns = 20000, 20000
    assert ds.Rows * ds.Columns > MAX_IMAGE_PIXELS
    return save(ds, path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (multi_frame, "has 2 frames; give one image per file"),
        (no_pixel_data, "no pixel data"),
        (text_file, "not a DICOM file or readable image"),
        (truncated_in_pixels, "truncated"),
        (truncated_in_header, "truncated"),
        (over_the_size_limit, "over the limit"),
    ],
    ids=lambda value: getattr(value, "__name__", "")[:20] or None,
)
def test_bad_dicoms_are_refused_in_one_line_naming_the_file(source: Path, tmp_path: Path, make, message) -> None:
    path = make(source, tmp_path / "bad.dcm")
    with pytest.raises(CovidxrError) as caught:
        read_image(path)
    assert one_line_naming(caught.value, path), str(caught.value)
    assert message in str(caught.value)
    for value in PATIENT.values():
        assert value not in str(caught.value)


def test_dicom_suffixes_are_image_suffixes() -> None:
    assert {".dcm", ".dicom"} <= IMAGE_SUFFIXES


# ---------------------------------------------------------------------------------------------
# Privacy
# ---------------------------------------------------------------------------------------------


def test_safe_facts_carry_no_patient_data(source: Path, tmp_path: Path) -> None:
    ds = dx_dataset(to_bits(grey(source), 12), 12, WindowCenter=2048, WindowWidth=4096, PatientSex="F")
    ds.InstitutionName, ds.StudyDate, ds.AccessionNumber = "St Elsewhere General", "20200314", "ACC99172"
    path = save(ds, tmp_path / "private.dcm")
    image, info = decode_dicom(path)
    facts = info.to_dict()
    assert set(facts) == {f for f in DicomInfo.__dataclass_fields__}
    assert not {"PatientName", "PatientID", "PatientBirthDate", "patient_name", "patient_id"} & set(facts)
    text = repr(facts) + repr(info) + repr(image.info)
    for value in [*PATIENT.values(), "Doe", "7731904", "St Elsewhere", "20200314", "ACC99172"]:
        assert value not in text
    assert facts["modality"] == "DX" and facts["voi"] == "window" and facts["bits_stored"] == 12


def test_the_level_table_gives_every_pixel_the_level_its_transforms_give(source: Path, tmp_path: Path) -> None:
    """Issue 27: grey pixels go through a table of the values present (a 3000 x 2500 film: thousands of values, not
    millions of pixels); for every kind of transform the levels are those of mapping each pixel, byte for byte."""
    import pydicom

    from covidxr.runtime.dicom import _grey_levels, _grey_to_8bit, _info, _stored_values

    base = to_bits(grey(source), 12)
    noise = np.random.default_rng(0).integers(0, 4096, base.shape).astype(np.uint16)  # every 12-bit value present
    table = np.rint(4095 * (np.arange(4096) / 4095) ** 0.6).astype(np.uint16)
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 12])
    item.add_new(0x00283006, "US", table.tolist())
    cases = {
        "12-bit": dx_dataset(base, 12),
        "noise": dx_dataset(noise, 12),
        "8-bit": dx_dataset(grey(source), 8),
        "16-bit": dx_dataset(to_bits(grey(source), 16), 16),
        "monochrome1 window": dx_dataset(4095 - base, 12, "MONOCHROME1", WindowCenter=2200, WindowWidth=1800),
        "rescale window": dx_dataset(
            base, 12, RescaleSlope=2.0, RescaleIntercept=-1024.0, WindowCenter=2000, WindowWidth=5000
        ),
        "rescale": dx_dataset(base, 12, RescaleSlope=0.5, RescaleIntercept=7.25),
        "sigmoid": dx_dataset(base, 12, WindowCenter=1500, WindowWidth=900, VOILUTFunction="SIGMOID"),
        "signed": dx_dataset(base.astype(np.int16) - 2048, 12, PixelRepresentation=1, WindowCenter=0, WindowWidth=2000),
        "signed full span": dx_dataset(
            (noise.astype(np.int32) * 16 - 32768).astype(np.int16), 16, PixelRepresentation=1
        ),
        "voi lut": dx_dataset(base, 12, VOILUTSequence=Sequence([item])),
        "high bits": dx_dataset(base | 0x8000, 12),  # BitsStored understates the data: every bit is kept
    }
    for name, ds in cases.items():
        path = save(ds, tmp_path / f"{name}.dcm")
        read = pydicom.dcmread(path)
        info = _info(read, str(path))
        read.pixel_array_options(correct_unused_bits=False)
        stored = _stored_values(np.asarray(read.pixel_array), read, info)
        assert int(stored.max()) - int(stored.min()) < stored.size  # the table path, not the pixel-by-pixel one
        levels = _grey_to_8bit(stored, read, info)
        assert levels.dtype == np.uint8 and np.array_equal(levels, _grey_levels(stored, read, info)), name
        assert np.array_equal(levels, _grey_levels(stored.astype(np.int64), read, info)), name  # as before issue 27
        assert np.array_equal(np.asarray(read_image(path).convert("L")), levels), name


def test_a_lateral_or_non_chest_dicom_gets_no_answer_on_every_route(run, runner, source: Path, tmp_path: Path) -> None:
    """A DICOM header that rules out an answer (a lateral view, another body part) gives no answer in ``predict``,
    in the Python API from bytes and in the service's decoder, with the header's reason, as its SR says."""
    from covidxr.runtime.api import Model
    from covidxr.runtime.inference import predict_files

    stored = to_bits(grey(source), 12)
    files = {
        "frontal": save(dx_dataset(stored, 12, ViewPosition="PA", BodyPartExamined="CHEST"), tmp_path / "pa.dcm"),
        "lateral": save(dx_dataset(stored, 12, ViewPosition="LL"), tmp_path / "ll.dcm"),
        "knee": save(dx_dataset(stored, 12, BodyPartExamined="KNEE"), tmp_path / "knee.dcm"),
    }
    reasons = {
        "frontal": None,
        "lateral": "a lateral view (ViewPosition LL); the model reads frontal chest X-rays",
        "knee": "not a chest image (BodyPartExamined KNEE); the model reads chest X-rays",
    }
    answers = dict(zip(files, predict_files(run, list(files.values()), progress=False, engine=runner), strict=True))
    model = Model(run)
    for name, path in files.items():
        from_bytes = model.predict(path.read_bytes())
        for answer in (answers[name], from_bytes):
            assert answer["no_answer_reason"] == reasons[name], (name, answer["no_answer_reason"])
            assert (answer["label"] is None) == (reasons[name] is not None)
    assert answers["frontal"]["probabilities"] == pytest.approx(answers["lateral"]["probabilities"])  # same pixels
