"""``covidxr dicom-node``: a DICOM Storage SCP (pynetdicom) that predicts each chest radiograph it receives and
sends the SR and the Secondary Capture (``covidxr.runtime.dicom_out``) to a destination by C-STORE.

Nothing received is lost, whatever happens after the C-STORE is acknowledged:

* each accepted image is written to ``SPOOL/inbox`` before the sender hears "success", and leaves it only once
  its results are in ``SPOOL/outbox`` (or, when it cannot be read, in ``SPOOL/failed`` with a logged reason);
* results leave ``SPOOL/outbox`` only once the destination stored them: a refusal is retried with backoff,
  then kept there and sent again on the next start, which also predicts whatever ``inbox`` still holds;
* SIGTERM stops taking associations, lets the open ones finish for a while, finishes the batch in hand and
  leaves the rest persisted.

Associations share one bounded queue: when it is full a C-STORE is answered "out of resources" (A700), so the
sender retries later. Objects covidxr cannot read (not CR, DX or secondary capture, not the chest, covidxr's own
output) are refused with a logged reason. Each study gets one log line, naming it by Study Instance UID: never
a patient's name or ID.
"""

from __future__ import annotations

import logging
import queue
import re
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)

from covidxr.runtime.dicom import view_refusal
from covidxr.runtime.dicom_out import dicom_results, uid_file_name, write_whole
from covidxr.runtime.errors import CovidxrError

if TYPE_CHECKING:
    from covidxr.runtime.api import Model

__all__ = ["ACCEPTED", "Destination", "DicomNode"]

logger = logging.getLogger(__name__)

ACCEPTED = {
    ComputedRadiographyImageStorage: "CR",
    DigitalXRayImageStorageForPresentation: "DX",
    DigitalXRayImageStorageForProcessing: "DX (for processing)",
    SecondaryCaptureImageStorage: "secondary capture",
}
SUCCESS, OUT_OF_RESOURCES, SOP_CLASS_NOT_SUPPORTED, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0x0122, 0xC000
PYNETDICOM_EXTRA = 'the DICOM node needs pynetdicom and highdicom: pip install "covidxr[pacs]"'


@dataclass(frozen=True)
class Destination:
    """Where results go: a DICOM node's AE title, host and port (``AET@HOST:PORT``)."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AET@HOST:PORT``, or CovidxrError saying what is wrong with it."""
        match = re.fullmatch(r"([^@\\]{1,16})@([^:@]+):(\d{1,5})", text.strip())
        if match is None or not 0 < int(match[3]) < 65536:
            raise CovidxrError(f"--send-to {text!r}: expected AET@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
        return cls(match[1], match[2], int(match[3]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass
class _Study:
    """A study's tally, for its one log line: written once nothing of it is queued and no association holds it."""

    answers: Counter = field(default_factory=Counter)
    pending: int = 0
    open_associations: int = 0
    refused: Counter = field(default_factory=Counter)


class DicomNode:
    """The Storage SCP: ``start()`` (returns at once), ``stop()``; ``serve_forever()`` runs until SIGTERM/SIGINT."""

    def __init__(
        self,
        model: Model,
        destination: Destination,
        spool: str | Path,
        ae_title: str = "COVIDXR",
        host: str = "127.0.0.1",
        port: int = 11112,
        max_queue: int = 64,
        batch_size: int = 8,
        retries: int = 3,
        backoff_s: float = 1.0,
        drain_s: float = 10.0,
    ):
        self.model, self.destination = model, destination
        self.ae_title, self.host, self.port = ae_title, host, port
        self.batch_size, self.retries, self.backoff_s, self.drain_s = batch_size, retries, backoff_s, drain_s
        self.spool = Path(spool)
        self.inbox, self.outbox, self.failed = (self.spool / name for name in ("inbox", "outbox", "failed"))
        self._queue: queue.Queue[Path] = queue.Queue(max_queue)
        self._sending: queue.Queue[Path] = queue.Queue()
        self._stopping = threading.Event()
        self._predicted_all = threading.Event()
        self._studies: dict[str, _Study] = {}
        self._association_studies: dict[int, set[str]] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._server = None
        self._ae = None

    # -----------------------------------------------------------------------------------------
    # Life cycle
    # -----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Take up what the last run left (results to send, images to predict), then listen."""
        try:
            from pynetdicom import AE, StoragePresentationContexts, evt
            from pynetdicom.sop_class import Verification
        except ImportError:
            raise CovidxrError(PYNETDICOM_EXTRA) from None
        for folder in (self.inbox, self.outbox, self.failed):
            folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.spool.rglob("*.partial"):
            leftover.unlink()  # a write cut short: its sender was never told "success"
        waiting = sorted(self.outbox.glob("*.dcm"))
        for path in waiting:
            self._sending.put(path)
        received = sorted(self.inbox.glob("*.dcm"), key=lambda p: p.stat().st_mtime_ns)
        for path in received:  # each study still gets one line, once all of it is predicted
            self._studies.setdefault(_study_of(path), _Study()).pending += 1
        self._threads = [
            threading.Thread(target=self._predict_loop, name="covidxr-predict", daemon=True),
            threading.Thread(target=self._send_loop, name="covidxr-send", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        for path in received:  # blocks while the queue is full: the worker is already taking from it
            self._queue.put(path)
        if waiting or received:
            logger.info(f"resuming: {len(received)} received image(s) to predict, {len(waiting)} result(s) to send")
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Verification)
        transfer_syntaxes = _all_transfer_syntaxes()
        for context in StoragePresentationContexts:  # any storage object may come: the unreadable get a reason
            ae.add_supported_context(context.abstract_syntax, transfer_syntaxes)
        ae.add_requested_context(SecondaryCaptureImageStorage)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.88.33")  # Comprehensive SR
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        self._ae = ae
        try:
            self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            self._stopping.set()
            self._predicted_all.set()
            raise CovidxrError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        logger.info(f"covidxr DICOM node {self.ae_title} on {self.host}:{self.port}, sending to {self.destination}")

    def stop(self) -> None:
        """Stop listening, let open associations finish (up to ``drain_s``), finish the batch in hand; what is
        still queued stays in the inbox and what is not sent in the outbox, for the next start."""
        if self._server is not None:
            self._server.shutdown()
            deadline = time.monotonic() + self.drain_s
            while self._ae.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            self._ae.shutdown()
        self._stopping.set()
        for thread in self._threads:  # the predictor first: the sender then takes what its last batch made
            if thread.name == "covidxr-send":
                self._predicted_all.set()
            thread.join()
        left, unsent = len(list(self.inbox.glob("*.dcm"))), len(list(self.outbox.glob("*.dcm")))
        logger.info(
            f"stopped: {left} image(s) in {self.inbox} to predict and {unsent} result(s) in {self.outbox} to "
            "send on the next start"
        )

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then ``stop`` gracefully."""
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        done.wait()
        logger.info("stopping (signal received)")
        self.stop()

    # -----------------------------------------------------------------------------------------
    # Receiving
    # -----------------------------------------------------------------------------------------

    def _on_store(self, event) -> int:
        """One C-STORE: refuse what covidxr cannot read (logged), answer busy when the queue is full, else
        persist the image and queue it."""
        calling = event.assoc.requestor.ae_title
        try:
            ds: Dataset = event.dataset
            ds.file_meta = event.file_meta
            _ = ds.get("SOPClassUID"), ds.get("StudyInstanceUID")
        except Exception as exc:  # pydicom reports a damaged data set through many exception types
            logger.warning(f"refused an object from {calling}: its data set cannot be decoded ({type(exc).__name__})")
            return CANNOT_UNDERSTAND
        study = str(ds.get("StudyInstanceUID", "") or "(no study)")
        refusal = self._refusal(ds)
        if refusal is not None:
            reason, status = refusal
            logger.warning(f"refused an object of study {study} from {calling}: {reason}")
            self._tally(event, study, refused=reason.split(" (")[0])
            return status
        if self._queue.full() or self._stopping.is_set():
            logger.warning(f"busy: queue of {self._queue.maxsize} full; told {calling} to send again later (A700)")
            return OUT_OF_RESOURCES
        path = self.inbox / f"{uid_file_name(str(ds.SOPInstanceUID))}.dcm"
        try:
            write_whole(ds, path)
        except OSError as exc:
            logger.warning(f"cannot keep an image of study {study}: {exc}; told {calling} to send it again (A700)")
            return OUT_OF_RESOURCES
        self._tally(event, study, pending=1)
        try:
            self._queue.put_nowait(path)
        except queue.Full:  # another association filled it meanwhile: the file is not acknowledged, so remove it
            path.unlink(missing_ok=True)
            self._tally(event, study, pending=-1)
            return OUT_OF_RESOURCES
        return SUCCESS

    @staticmethod
    def _refusal(ds: Dataset) -> tuple[str, int] | None:
        """Why covidxr refuses an object, with the C-STORE status that says so; None for one it takes."""
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class not in ACCEPTED:
            name = getattr(ds.get("SOPClassUID"), "name", sop_class) or "(none)"
            why = f"not a chest radiograph covidxr reads ({name}; it takes CR, DX or secondary capture)"
            return why, SOP_CLASS_NOT_SUPPORTED
        if not ds.get("SOPInstanceUID") or not ds.get("StudyInstanceUID"):
            return "no SOP Instance UID or Study Instance UID", CANNOT_UNDERSTAND
        if str(ds.get("Manufacturer", "")) == "covidxr":
            return "covidxr's own output", CANNOT_UNDERSTAND
        view = view_refusal(ds)
        if view is not None and view.startswith("not a chest"):
            return view, CANNOT_UNDERSTAND
        return None

    def _tally(self, event, study: str, pending: int = 0, refused: str | None = None) -> None:
        with self._lock:
            record = self._studies.setdefault(study, _Study())
            seen = self._association_studies.setdefault(id(event.assoc), set())
            if study not in seen:
                seen.add(study)
                record.open_associations += 1
            record.pending += pending
            if refused:
                record.refused[refused] += 1

    def _on_closed(self, event) -> None:
        with self._lock:
            studies = self._association_studies.pop(id(event.assoc), set())
            for study in studies:
                self._studies[study].open_associations -= 1
        for study in studies:
            self._log_if_done(study)

    def _log_if_done(self, study: str) -> None:
        """The study's one log line, once nothing of it is queued or still arriving."""
        with self._lock:
            record = self._studies.get(study)
            if record is None or record.pending > 0 or record.open_associations > 0:
                return
            del self._studies[study]
        tally = sorted(record.answers.items(), key=lambda item: (-item[1], item[0]))
        said = ", ".join(f"{label} {n}" for label, n in tally) or "no image predicted"
        refused = "".join(f"; refused {n}: {why}" for why, n in record.refused.items())
        made = sum(n for label, n in record.answers.items() if label != "unreadable")
        sent = f"; {made} SR and SC pair(s) queued for {self.destination}" if made else ""
        logger.info(f"study {study}: {sum(record.answers.values())} image(s): {said}{refused}{sent}")

    # -----------------------------------------------------------------------------------------
    # Predicting and sending
    # -----------------------------------------------------------------------------------------

    def _predict_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                batch = [self._queue.get(timeout=0.1)]
            except queue.Empty:
                continue
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._predict(batch)

    def _predict(self, paths: list[Path]) -> None:
        """Predict a batch; each image's failure is logged and the image kept in ``failed``, never lost."""
        studies = [_study_of(path) for path in paths]
        try:
            results = dicom_results(self.model, paths, self.batch_size)
        except Exception as exc:  # a batch-wide failure (the engine): keep the images for the next start
            logger.warning(f"could not predict {len(paths)} image(s) ({exc}); kept in {self.inbox}")
            return
        for path, study, result in zip(paths, studies, results, strict=True):
            if result.error is not None:
                reason = result.error.split(": ", 1)[-1]
                logger.warning(f"image {path.stem} of study {study}: {reason}; skipped (kept in {self.failed})")
                path.replace(self.failed / path.name)
                said = "unreadable"
            else:
                for kind, ds in (("sr", result.sr), ("sc", result.sc)):
                    target = self.outbox / f"{path.stem}.{kind}.dcm"
                    write_whole(ds, target)
                    self._sending.put(target)
                path.unlink()
                said = result.answer["label"] or "no answer"
            with self._lock:
                record = self._studies.setdefault(study, _Study())
                record.pending -= 1
                record.answers[said] += 1
            self._log_if_done(study)

    def _send_loop(self) -> None:
        while not (self._predicted_all.is_set() and self._sending.empty()):
            try:
                batch = [self._sending.get(timeout=0.1)]
            except queue.Empty:
                continue
            while True:
                try:
                    batch.append(self._sending.get_nowait())
                except queue.Empty:
                    break
            self._send(batch)

    def _send(self, paths: list[Path]) -> None:
        """C-STORE ``paths`` to the destination in one association; what is refused is retried with backoff,
        then left in the outbox (sent again on the next start)."""
        waiting = [path for path in paths if path.is_file()]
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            waiting, why = self._store(waiting)
            if not waiting:
                return
            if self._stopping.is_set():
                break
        logger.warning(
            f"{len(waiting)} result(s) not stored by {self.destination} ({why}); kept in {self.outbox}, sent again "
            "on the next start"
        )

    def _store(self, paths: list[Path]) -> tuple[list[Path], str]:
        """One association's C-STOREs; the paths not stored, and why."""
        from pynetdicom import AE

        ae = AE(ae_title=self.ae_title)
        for sop_class in {str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID) for path in paths}:
            ae.add_requested_context(sop_class)
        assoc = ae.associate(self.destination.host, self.destination.port, ae_title=self.destination.ae_title)
        if not assoc.is_established:
            return paths, "association refused or no answer"
        left, why = [], ""
        try:
            for path in paths:
                status = assoc.send_c_store(path)
                code = getattr(status, "Status", None)
                if code in (0x0000, 0xB000, 0xB006, 0xB007):  # success, or a warning: stored
                    path.unlink(missing_ok=True)
                else:
                    left.append(path)
                    why = "no answer" if code is None else f"status 0x{code:04X}"
        finally:
            assoc.release()
        return left, why


def _all_transfer_syntaxes() -> list[str]:
    """Every transfer syntax pydicom can decode pixels from (the uncompressed ones and the compressed ones its
    plugins read), so a modality may send as it stores."""
    from pydicom.uid import AllTransferSyntaxes, DeflatedExplicitVRLittleEndian

    return [str(uid) for uid in AllTransferSyntaxes if uid != DeflatedExplicitVRLittleEndian]


def _study_of(path: Path) -> str:
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True).get("StudyInstanceUID", "(no study)"))
    except Exception:  # an unreadable file's study is unknown; its failure is still logged
        return "(unknown study)"
