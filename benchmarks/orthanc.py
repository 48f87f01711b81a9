"""A real PACS for the tests and the benchmark: Debian's Orthanc started on 127.0.0.1 ports with its storage in a
temporary folder, driven through its REST API; and real chest X-rays written as a DICOM study to send it."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "MRN-7731904", "PatientBirthDate": "19580214", "PatientSex": "F"}


def write_study(images: Sequence[Path], folder: Path, seed: int = 0, **attrs: object) -> list[Path]:
    """Each real image (PNG/JPEG) written as a 12-bit DX For Presentation instance of one new study in ``folder``,
    with patient tags and a private tag (neither file path nor private tag may reach covidxr's output)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = (generate_uid(entropy_srcs=[str(seed), kind]) for kind in ("study", "series"))
    paths = []
    for number, image in enumerate(images, 1):
        grey = np.asarray(Image.open(image).convert("L"), dtype=np.float64)
        pixels = np.rint(grey * 4095 / 255).astype(np.uint16)
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = DigitalXRayImageStorageForPresentation
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(seed), str(number), image.name])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240301", "101500", "ACC123", "S1"
        ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "Ref^Doctor", 1, number
        ds.PatientOrientation = ["L", "F"]
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        for keyword, value in {**PATIENT, **attrs}.items():
            setattr(ds, keyword, value)
        ds.add_new(0x00111001, "LO", "covidxr-test")  # private creator
        ds.add_new(0x00111010, "LO", "a private value that must not be copied")
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.tobytes()
        path = folder / f"{number:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class Orthanc:
    """Orthanc with its own configuration: HTTP and DICOM on 127.0.0.1, storage under ``root``, the given
    ``modalities`` (name → (AE title, host, port)) registered. Use as a context manager: it stops on exit."""

    def __init__(self, root: Path, http_port: int, dicom_port: int, modalities: dict[str, tuple[str, str, int]]):
        self.root, self.http_port, self.dicom_port = root, http_port, dicom_port
        self.url = f"http://127.0.0.1:{http_port}"
        root.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "covidxr-test",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "storage"),
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {name: list(entry) for name, entry in modalities.items()},
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "Plugins": [],
            "StableAge": 1,
            "SaveJobs": False,
        }
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2))
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Orthanc:
        log = open(self.root / "orthanc.log", "wb")  # noqa: SIM115 (closed with the process)
        self.process = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.root / 'orthanc.log').read_text()[-2000:]}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        raise RuntimeError("Orthanc did not answer within 60 s")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)

    def request(self, method: str, path: str, body: bytes | dict | list | str | None = None) -> object:
        """One REST call; JSON bodies and answers as Python values, raw bytes otherwise."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=120) as response:
            raw = response.read()
            if "json" in response.headers.get("Content-Type", ""):
                return json.loads(raw)
            return raw

    def get(self, path: str) -> object:
        return self.request("GET", path)

    def upload(self, path: Path) -> dict:
        """POST /instances: a DICOM file stored, as Orthanc answers (ID, ParentStudy, ...)."""
        return self.request("POST", "/instances", path.read_bytes())

    def store(self, modality: str, resources: list[str]) -> object:
        """Orthanc sends ``resources`` (instance, series or study IDs) to ``modality`` by C-STORE, in one
        association; returns once the transfer is done."""
        return self.request("POST", f"/modalities/{modality}/store", {"Resources": resources, "Synchronous": True})

    def instances(self, study: str) -> list[dict]:
        """The study's instances, each with its main tags (SOPClassUID among them)."""
        return self.get(f"/studies/{study}/instances")

    def file(self, instance: str) -> bytes:
        return self.get(f"/instances/{instance}/file")
