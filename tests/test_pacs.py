"""DICOM results out (SR and Secondary Capture, highdicom) and the DICOM node (pynetdicom), against a real PACS:
Debian's Orthanc, started here on 127.0.0.1 ports with its storage in a temporary folder. The SR is also read
by an independent parser, dcmtk's dsrdump. Every image is a real chest X-ray written as DICOM by the tests."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from benchmarks.machine import linked_dataset
from benchmarks.orthanc import PATIENT, Orthanc, write_study
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from covidxr.runtime.dicom_out import CODES, SERIES_DESCRIPTION
from tests.conftest import ADULT_CONTROLS, CXR3, PROBABILITY_TOLERANCE, assert_one_line_error, free_port, run_cli

if find_spec("highdicom") is None or find_spec("pynetdicom") is None:
    pytest.fail('the PACS tests need the pacs extra: scripts/setup.sh installs ".[train,dev,pacs]"', pytrace=False)
if shutil.which("dsrdump") is None or not Path("/usr/sbin/Orthanc").exists() and shutil.which("Orthanc") is None:
    pytest.fail("Orthanc and dcmtk are needed: scripts/setup.sh installs them (apt: orthanc dcmtk)", pytrace=False)

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PRIVATE_VALUE = "a private value that must not be copied"


@pytest.fixture(scope="module")
def images() -> list[Path]:
    """Three real radiographs, one per class."""
    meta = pd.read_csv(CXR3 / "metadata.csv", dtype=str, keep_default_na=False)
    return [CXR3 / meta[meta["label"] == label]["filename"].iloc[0] for label in ("COVID-19", "NORMAL", "PNEUMONIA")]


@pytest.fixture(scope="module")
def site_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``covidxr calibrate`` on 24 real NIH adult controls (specificity 95%): a site's own operating point."""
    meta = pd.read_csv(ADULT_CONTROLS / "metadata.csv", dtype=str, keep_default_na=False)
    root = linked_dataset(tmp_path_factory.mktemp("site-images"), ADULT_CONTROLS, meta.head(24))
    site = root / "site.json"
    result = run_cli("calibrate", root, "--specificity", "0.95", "--site-name", "test site", "--out", site)
    assert result.returncode == 0, result.stderr
    return site


def predicted(paths: list[Path], *options: str | Path) -> dict[str, dict]:
    """``covidxr predict --json`` of ``paths``, by SOP Instance UID."""
    result = run_cli("predict", "--json", *options, *paths)
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    return {pydicom.dcmread(a["file"], stop_before_pixels=True).SOPInstanceUID: a for a in answers}


def sr_content(sr: Dataset) -> dict:
    """What the SR's measurement group says: the source reference, p(COVID-19), the codes and any text."""
    group = sr.ContentSequence[-1].ContentSequence[0]
    out: dict = {"codes": {}, "text": {}}
    for item in group.ContentSequence:
        name = item.ConceptNameCodeSequence[0].CodeValue
        if item.ValueType == "NUM":
            out["p"] = float(item.MeasuredValueSequence[0].NumericValue)
            out["unit"] = item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue
        elif item.ValueType == "CODE":
            out["codes"][name] = item.ConceptCodeSequence[0].CodeValue
        elif item.ValueType == "TEXT":
            out["text"][name] = item.TextValue
        elif item.ValueType == "IMAGE":
            out["reference"] = item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    return out


def check_result_pair(sr: Dataset, sc: Dataset, source: Dataset, answer: dict) -> None:
    """The SR and SC of one source image: in its study, its patient, the answer ``predict`` gave (and the operating
    point and site file, ``site_file``'s "test site", that decided it), nothing private."""
    for ds in (sr, sc):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.SeriesDescription == SERIES_DESCRIPTION
        for keyword, value in PATIENT.items():
            assert str(ds.get(keyword)) == value
        assert ds.AccessionNumber == source.AccessionNumber
        assert not any(element.tag.is_private for element in ds.iterall())
        text = str(ds)
        assert PRIVATE_VALUE not in text and "/tmp" not in text and ".dcm" not in text
    assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.VerificationFlag == "UNVERIFIED"
    content = sr_content(sr)
    assert content["reference"] == source.SOPInstanceUID
    parameters = [
        item.TextValue
        for item in sr.ContentSequence[-1].ContentSequence[0].ContentSequence
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"
    ]
    assert f"covid_threshold={answer['covid_threshold']:.4f}" in parameters
    sites = [text for text in parameters if text.startswith("site=")]
    assert sites == ([] if answer["site"] is None else ["site=test site (site.json)"]), parameters
    assert abs(content["p"] - answer["probabilities"]["COVID-19"]) < PROBABILITY_TOLERANCE
    assert content["unit"] == "1"
    if answer["label"] is None:
        expected = CODES["undetermined"].value
    else:
        expected = CODES["present" if answer["covid_positive"] else "absent"].value
    assert content["codes"][CODES["covid19"].value] == expected
    assert sc.SOPClassUID == SECONDARY_CAPTURE and sc.BurnedInAnnotation == "YES"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    pixels = sc.pixel_array
    assert sc.PhotometricInterpretation == "RGB" and pixels.shape[2] == 3
    band = pixels[: max(40, (pixels.shape[0] - 40) // 9)]  # the burnt-in lines: white text on black
    assert (band.max(axis=2) < 30).mean() > 0.6 and (band.min(axis=2) > 200).any()


def dsrdump(data: bytes, tmp_path: Path) -> str:
    """The SR as dcmtk reads it (an independent parser): its text, after a clean exit."""
    path = tmp_path / "sr.dcm"
    path.write_bytes(data)
    result = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_command_line_loads_no_dicom_network_library_and_refuses_a_bad_destination() -> None:
    """highdicom and pynetdicom are imported on first use (``covidxr --help`` stays fast); a malformed
    --send-to is refused in one line before the model loads."""
    check = "import sys, covidxr.cli; print(sorted(m for m in ('highdicom', 'pynetdicom') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
    assert_one_line_error(run_cli("dicom-node", "--send-to", "ORTHANC:4242"), "--send-to", "AET@HOST:PORT")


# ---------------------------------------------------------------------------------------------
# predict --dicom-out
# ---------------------------------------------------------------------------------------------


def test_predict_dicom_out_writes_an_sr_and_sc_per_dicom_input(
    images: list[Path], site_file: Path, tmp_path: Path
) -> None:
    study = write_study(images, tmp_path / "study")
    lateral = write_study(images[:1], tmp_path / "lateral", seed=1, ViewPosition="LL")[0]
    no_pixels = write_study(images[:1], tmp_path / "nopixels", seed=2)[0]
    ds = pydicom.dcmread(no_pixels)
    del ds.PixelData
    ds.save_as(no_pixels)
    no_study = write_study(images[1:2], tmp_path / "nostudy", seed=3)[0]
    ds = pydicom.dcmread(no_study)
    del ds.StudyInstanceUID
    ds.save_as(no_study)
    out = tmp_path / "dicom-out"
    (out).mkdir()
    (out / "kept.txt").write_text("an existing output")
    files = [*study, lateral, no_pixels, no_study, images[0]]
    result = run_cli("predict", "--json", "--site", site_file, "--dicom-out", out, *files)
    assert result.returncode == 1  # the file without pixel data is an error row, as in any predict
    assert "Traceback" not in result.stderr
    answers = {Path(a["file"]): a for a in json.loads(result.stdout)}
    assert "no pixel data" in answers[no_pixels]["error"]
    summary = [line for line in result.stderr.splitlines() if line.startswith("DICOM results:")]
    assert summary == [
        f"DICOM results: 4 SR + SC pair(s) → {out}; 1 input(s) not DICOM, so no DICOM output; "
        "2 DICOM file(s) got none (their errors say why)"
    ]
    assert answers[no_study]["label"] is not None  # predict answers it; only its results have no study to go in
    assert f"ERROR no SR or SC: {no_study}: DICOM lacks StudyInstanceUID, needed to place" in result.stderr
    assert "a lateral view (ViewPosition LL)" in result.stderr
    assert (out / "kept.txt").read_text() == "an existing output"
    written = sorted(out.glob("*.dcm"))
    assert len(written) == 8  # the lateral view too; nothing for the files without pixels or study, or the JPEG
    for path in [*study, lateral]:
        source = pydicom.dcmread(path)
        sr = pydicom.dcmread(out / f"{source.SOPInstanceUID}.sr.dcm")
        sc = pydicom.dcmread(out / f"{source.SOPInstanceUID}.sc.dcm")
        answer = answers[path]
        if path == lateral:  # no answer, from predict and in the SR alike
            assert answer["label"] is None and answer["covid_positive"] is None
            assert answer["no_answer_reason"].startswith("a lateral view (ViewPosition LL); the model reads frontal")
            assert "lateral view" in sr_content(sr)["text"][CODES["reason"].value]
        check_result_pair(sr, sc, source, answer)
    first = (out / f"{pydicom.dcmread(study[0]).SOPInstanceUID}.sr.dcm").read_bytes()
    dump = dsrdump(first, tmp_path)
    assert "Verification Flag   : UNVERIFIED" in dump
    assert '(840539006,SCT,"Disease caused by SARS-CoV-2")' in dump
    assert 'NUM:(,,"Probability of COVID-19")' in dump


# ---------------------------------------------------------------------------------------------
# The DICOM node against a real Orthanc
# ---------------------------------------------------------------------------------------------


class Node:
    """``covidxr dicom-node`` in a subprocess, sending to Orthanc; ``stop`` sends SIGTERM."""

    def __init__(self, port: int, send_to: str, spool: Path, *extra: str):
        self.port, self.log = port, spool.parent / f"{spool.name}-{time.monotonic_ns()}.log"
        args = ["--port", str(port), "--send-to", send_to, "--spool", str(spool), *extra]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "covidxr", "dicom-node", *args], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 120
        while "covidxr DICOM node" not in self.text():
            assert self.process.poll() is None, self.text()
            assert time.monotonic() < deadline, self.text()
            time.sleep(0.1)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(60) == 0, self.text()
        return self.text()


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {"http": free_port(), "dicom": free_port(), "node": free_port()}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, ports: dict[str, int]) -> Iterator[Orthanc]:
    modalities = {"covidxr": ("COVIDXR", "127.0.0.1", ports["node"])}
    with Orthanc(tmp_path_factory.mktemp("orthanc"), ports["http"], ports["dicom"], modalities) as server:
        yield server


def results_by_source(orthanc: Orthanc, study: str, sources: int) -> dict[str, tuple[Dataset, Dataset, bytes]]:
    """The SR and SC in Orthanc's ``study`` for each of its ``sources`` source images, by the source's SOP
    Instance UID (read back from Orthanc's files), once all have arrived."""
    deadline = time.monotonic() + 120
    while len(orthanc.instances(study)) < 3 * sources and time.monotonic() < deadline:
        time.sleep(0.1)
    pairs: dict[str, dict] = {}
    for instance in orthanc.instances(study):
        data = orthanc.file(instance["ID"])
        ds = pydicom.dcmread(io.BytesIO(data))
        if ds.SOPClassUID == COMPREHENSIVE_SR:
            pairs.setdefault(sr_content(ds)["reference"], {}).update(sr=ds, bytes=data)
        elif ds.SOPClassUID == SECONDARY_CAPTURE:
            pairs.setdefault(ds.SourceImageSequence[0].ReferencedSOPInstanceUID, {})["sc"] = ds
    return {uid: (pair["sr"], pair["sc"], pair["bytes"]) for uid, pair in pairs.items() if len(pair) == 3}


def test_orthanc_round_trip(
    orthanc: Orthanc, ports: dict[str, int], images: list[Path], site_file: Path, tmp_path: Path
) -> None:
    """Orthanc C-STOREs a real study to covidxr's node (with a site file); the SR and SC come back into the same
    study in Orthanc, with predict's p(COVID-19), the right code, the site and the reference; dsrdump reads the SR;
    one log line per study."""
    paths = write_study(images, tmp_path / "study", seed=10)
    expected = predicted(paths, "--site", site_file)
    uploaded = [orthanc.upload(path) for path in paths]
    study = uploaded[0]["ParentStudy"]
    node = Node(ports["node"], f"ORTHANC@127.0.0.1:{ports['dicom']}", tmp_path / "spool", "--site", str(site_file))
    try:
        orthanc.store("covidxr", [study])
        results = results_by_source(orthanc, study, len(paths))
    finally:
        log = node.stop()
    assert set(results) == set(expected), log
    for uid, (sr, sc, data) in results.items():
        source = pydicom.dcmread(paths[[pydicom.dcmread(p).SOPInstanceUID for p in paths].index(uid)])
        check_result_pair(sr, sc, source, expected[uid])
        dump = dsrdump(data, tmp_path)
        shown = re.search(r'NUM:\(,,"Probability of COVID-19"\)="([0-9.eE+-]+)" \(1,UCUM', dump)
        assert shown is not None, dump
        assert abs(float(shown[1]) - expected[uid]["probabilities"]["COVID-19"]) < PROBABILITY_TOLERANCE
        assert (
            source.SOPInstanceUID
            in subprocess.run(
                ["dsrdump", "+Pu", str(tmp_path / "sr.dcm")], capture_output=True, text=True, check=True
            ).stdout
        )
    study_uid = pydicom.dcmread(paths[0]).StudyInstanceUID
    tally = Counter(a["label"] or "no answer" for a in expected.values())
    said = ", ".join(f"{label} {n}" for label, n in sorted(tally.items(), key=lambda item: (-item[1], item[0])))
    line = f"study {study_uid}: 3 image(s): {said}; 3 SR and SC pair(s) queued for ORTHANC@127.0.0.1:{ports['dicom']}"
    assert [text for text in log.splitlines() if text.startswith("study ")] == [line], log
    assert "Doe" not in log and PATIENT["PatientID"] not in log
    assert not list((tmp_path / "spool").rglob("*.dcm"))  # everything predicted and delivered


def test_node_refuses_skips_and_stays_up(ports: dict[str, int], images: list[Path], tmp_path: Path) -> None:
    """Over one association: a CT is refused (SOP class), a knee radiograph refused (not the chest), an image
    without pixel data accepted then logged and kept in failed/, and the chest X-ray after them still answered.
    A destination that refuses every C-STORE (nothing listening) leaves the results in the outbox after the
    retries; SIGTERM stops the node with exit 0, and the next start, with Orthanc up, delivers them."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, DigitalXRayImageStorageForPresentation

    good, knee, broken = (
        write_study(images[:1], tmp_path / name, seed=20 + i, **attrs)[0]
        for i, (name, attrs) in enumerate([("good", {}), ("knee", {"BodyPartExamined": "KNEE"}), ("broken", {})])
    )
    ct = pydicom.dcmread(good)
    ct.SOPClassUID, ct.Modality, ct.SOPInstanceUID = CTImageStorage, "CT", generate_uid(entropy_srcs=["ct"])
    ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
    damaged = pydicom.dcmread(broken)
    del damaged.PixelData
    dead_port = free_port()  # nothing listens: every send is refused
    spool = tmp_path / "spool"
    node = Node(ports["node"], f"ORTHANC@127.0.0.1:{dead_port}", spool, "--retries", "2", "--backoff", "0.05")
    statuses = []
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(DigitalXRayImageStorageForPresentation)
        assoc = ae.associate("127.0.0.1", ports["node"], ae_title="COVIDXR")
        assert assoc.is_established
        for ds in (ct, pydicom.dcmread(knee), damaged, pydicom.dcmread(good)):
            statuses.append(assoc.send_c_store(ds).Status)
        assoc.release()
        deadline = time.monotonic() + 120
        while "not stored by" not in node.text() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        log = node.stop()
    assert statuses == [0x0122, 0xC000, 0x0000, 0x0000], log
    assert (
        "refused an object" in log and "CT Image Storage" in log and "not a chest image (BodyPartExamined KNEE)" in log
    )
    assert "no pixel data" in log and (spool / "failed" / f"{damaged.SOPInstanceUID}.dcm").is_file()
    assert "not stored by" in log and "kept in" in log
    kept = sorted(p.name for p in (spool / "outbox").glob("*.dcm"))
    good_uid = pydicom.dcmread(good).SOPInstanceUID
    assert kept == [f"{good_uid}.sc.dcm", f"{good_uid}.sr.dcm"], log
    # Restart with a destination that takes them: the outbox is sent.
    with Orthanc(tmp_path / "orthanc", free_port(), dead_port, {}) as server:
        node = Node(ports["node"], f"ORTHANC@127.0.0.1:{dead_port}", spool)
        try:
            deadline = time.monotonic() + 60
            while list((spool / "outbox").glob("*.dcm")) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            log = node.stop()
        assert "resuming: 0 received image(s) to predict, 2 result(s) to send" in log
        assert len(server.get("/instances")) == 2
    assert not list((spool / "outbox").glob("*.dcm"))


def test_node_busy_and_sigterm_lose_nothing(ports: dict[str, int], images: list[Path], tmp_path: Path) -> None:
    """A queue of one shared by two concurrent associations: their bursts of C-STOREs are partly answered busy
    (A700) and the rest is accepted; SIGTERM right after the bursts exits 0 with every accepted image either
    predicted or still in the inbox, and the next start delivers all of them to Orthanc."""
    from pynetdicom import AE
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

    burst = write_study(images * 2, tmp_path / "burst", seed=30)
    spool = tmp_path / "spool"
    dicom_port = free_port()
    with Orthanc(tmp_path / "orthanc", free_port(), dicom_port, {}) as server:
        node = Node(ports["node"], f"ORTHANC@127.0.0.1:{dicom_port}", spool, "--max-queue", "1")

        def send(paths: list[Path]) -> dict[Path, int]:
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(DigitalXRayImageStorageForPresentation)
            assoc = ae.associate("127.0.0.1", ports["node"], ae_title="COVIDXR")
            assert assoc.is_established
            sent = {path: assoc.send_c_store(path).Status for path in paths}
            assoc.release()
            return sent

        with ThreadPoolExecutor(2) as pool:
            statuses = {k: v for part in pool.map(send, [burst[::2], burst[1::2]]) for k, v in part.items()}
        log = node.stop()
        accepted = [path for path, status in statuses.items() if status == 0x0000]
        assert set(statuses.values()) == {0x0000, 0xA700}, (statuses, log)
        assert "busy: queue of 1 full" in log
        node = Node(ports["node"], f"ORTHANC@127.0.0.1:{dicom_port}", spool)
        try:
            deadline = time.monotonic() + 120
            while len(server.get("/instances")) < 2 * len(accepted) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            node.stop()
        references = set()
        for instance in server.get("/instances"):
            ds = pydicom.dcmread(io.BytesIO(server.file(instance)))
            if ds.SOPClassUID == COMPREHENSIVE_SR:
                references.add(sr_content(ds)["reference"])
    assert references == {pydicom.dcmread(path).SOPInstanceUID for path in accepted}
    assert not list(spool.rglob("*.dcm")), os.listdir(spool)
