"""The web service behind ``covidxr serve``: a page for the reading room and a JSON API, over one model.

- **One model per process**, loaded before the server starts; inference runs in one worker thread (the
  engine already uses every core), so the event loop keeps answering. At most ``max_queue`` requests
  are admitted (being received or waiting for it): one more gets HTTP 503 with ``Retry-After`` before
  its body is read, never a pile-up of uploads in memory.
- **Hostile clients** (docs/service-limits.md): memory follows decoded pixels, so a budget of pixels in flight
  admits uploads by their header's size, not their count; a body must keep a minimum rate (408 otherwise) and
  one client may send only a few at once (429), so clients that do not send cannot hold the queue; a form
  may have only a few parts, parsed off the event loop; explanations run in their own bounded lane, on a
  thread of lower priority, so predictions keep their latency.
- **Privacy.** Uploads are read into memory by the app itself (never spooled to a temporary file),
  limited to ``max_upload`` bytes before anything is decoded, type-checked by their first bytes, and
  never logged; the answer holds no DICOM tag, and no part of a request ever names a file to open.
  CORS is off: browsers only let the page's own origin call the API.
- Every answer that carries a prediction carries the research-use disclaimer.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import ctypes.util
import io
import os
import sys
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from hashlib import sha256
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from PIL import Image
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException

from covidxr import DISCLAIMER, __version__
from covidxr.runtime.answers import seen_in_training
from covidxr.runtime.api import Model
from covidxr.runtime.cam import jet
from covidxr.runtime.card import model_card, render_model_card_html
from covidxr.runtime.engines import physical_cores
from covidxr.runtime.errors import CovidxrError, ImageTooLarge
from covidxr.runtime.foreign import NO_EXPLANATION, ForeignModel
from covidxr.runtime.images import FULL_SIZE, MAX_IMAGE_PIXELS, decode_bytes
from covidxr.runtime.live_monitor import MONITOR_WINDOW, LiveMonitor, render_monitor_html
from covidxr.runtime.runners import head_digest
from covidxr.runtime.site import describe_site
from covidxr.runtime.source import looks_like_image

__all__ = ["Limits", "create_app", "serve"]

MAX_UPLOAD = 30 * 1024 * 1024  # bytes of image per request
MAX_QUEUE = 32  # requests admitted (being received or waiting for the model) before the next gets 503
PREVIEW_SIDE = 512  # the longest side of the images returned for display
MAX_BATCH = 32  # concurrent predictions answered by one engine call
BATCH_WAIT = 0.005  # seconds a prediction waits for others to join its batch
FIELD = "file"  # the multipart field that carries the image
MAX_PARTS = 8  # parts of a multipart form (the page sends one): more is refused before the rest is parsed
SHOWN_NAMES = 4  # field names a 422 lists, each cut to SHOWN_NAME characters: never the client's input at length
SHOWN_NAME = 32
TRIM_ABOVE = 10_000_000  # decoded pixels of an image after which the freed heap is handed back at once
# What an upload may be, recognised by its first bytes (its name and Content-Type are only claims).
RAW_TYPES = {"image/png", "image/jpeg", "image/tiff", "image/bmp", "application/dicom", "application/octet-stream"}
EXAMPLE = {"content": {"multipart/form-data": {"schema": {"type": "object", "required": [FIELD], "properties": {
    FIELD: {"type": "string", "format": "binary", "description": "PNG, JPEG, TIFF, BMP or DICOM, at most 30 MB"}
}}}}, "required": True}  # fmt: skip


@dataclass(frozen=True)
class Limits:
    """What one process lets hostile clients cost it (docs/service-limits.md says why each is its size)."""

    pixel_budget: int = 2 * MAX_IMAGE_PIXELS  # decoded pixels in flight: two of the largest images allowed
    budget_wait: float = 1.0  # seconds an upload waits for room in the budget before its 503
    body_grace: float = 5.0  # seconds a body may take before the minimum rate applies
    min_body_rate: int = 32 * 1024  # bytes per second a body must average after the grace
    body_timeout: float = 300.0  # seconds any body may take
    uploads_per_client: int = 4  # bodies one client address may send at once; more get 429
    max_explains: int = 4  # explanations admitted (running or waiting in their lane); more get 503
    explain_nice: int = 10  # the explanation thread's nice value (Linux): predictions come first


class ApiError(Exception):
    """An answer other than 200: its status, a one-line message and any extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status, "disclaimer": DISCLAIMER}, status, headers=headers)


def model_id(model: Model | ForeignModel) -> str:
    """Backbone, run folder name ("bundled" for the packaged model) and the head's hash: what a user
    quotes to say which model answered (a foreign model's ``identity``: its file, SHA-256 and spec)."""
    if isinstance(model, ForeignModel):
        return model.identity
    head = head_digest(model.run)[:12]
    return f"{model.run.info.model['name']}/{model.run.path.name}/{head}"


# ---------------------------------------------------------------------------------------------
# Reading an upload, in memory only
# ---------------------------------------------------------------------------------------------


async def timed_chunks(request: Request, limits: Limits) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive, refused with 408 when it falls below ``min_body_rate`` after
    ``body_grace`` seconds (a client sending nothing is cut off then) or takes over ``body_timeout``."""
    loop = asyncio.get_running_loop()
    start, size = loop.time(), 0
    stream = request.stream()
    try:
        while True:
            deadline = min(limits.body_timeout, max(limits.body_grace, size / limits.min_body_rate))
            try:
                chunk = await asyncio.wait_for(anext(stream), deadline - (loop.time() - start))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise ApiError(
                    408,
                    f"upload too slow: {size:,} bytes in {loop.time() - start:.0f} s (a body must average "
                    f"{limits.min_body_rate // 1024} KB/s after {limits.body_grace:g} s, and end within "
                    f"{limits.body_timeout:g} s)",
                    {"Connection": "close"},
                ) from None
            size += len(chunk)
            yield chunk
    finally:
        await stream.aclose()


async def read_body(request: Request, limit: int, limits: Limits) -> bytes:
    """The request body, refused with 413 beyond ``limit`` (an oversized body is read and discarded,
    up to four times the limit, so the client can read the answer rather than lose its connection),
    408 when it comes too slowly."""
    declared = request.headers.get("content-length")
    too_large = ApiError(413, f"upload over the limit of {limit // (1024 * 1024)} MB")
    if declared and declared.isdigit() and int(declared) > 4 * limit:
        raise too_large
    body, size = bytearray(), 0
    async for chunk in timed_chunks(request, limits):
        size += len(chunk)
        if size > 4 * limit:
            raise too_large
        if size <= limit + 64 * 1024:  # room for the multipart framing around the image
            body += chunk
    if size > limit + 64 * 1024:
        raise too_large
    return bytes(body)


async def discard_body(request: Request, limit: int, limits: Limits) -> None:
    """Receive a refused request's body without keeping it (so the client can read the answer rather
    than lose its connection); nothing is received when the client waits for ``100 Continue`` or the
    body is over four times ``limit``, or comes too slowly, whose connection is then closed after the answer."""
    declared = request.headers.get("content-length", "")
    waits = request.headers.get("expect", "").lower() == "100-continue"
    if waits or (declared.isdigit() and int(declared) > 4 * limit):
        return
    size = 0
    try:
        async for chunk in timed_chunks(request, limits):
            size += len(chunk)
            if size > 4 * limit:
                return
    except ApiError:
        return


class TooManyParts(Exception):
    """Raised from the parser's callback to stop at the first part over ``MAX_PARTS``."""


def multipart_fields(body: bytes, boundary: bytes) -> dict[str, bytes]:
    """Every field of a multipart/form-data body, parsed in memory (the first value of each name); 413 for a
    form of more than ``MAX_PARTS`` parts, refused at the first part over (the rest is never parsed)."""
    fields: dict[str, bytes] = {}
    state: dict[str, Any] = {"header": b"", "value": b"", "name": None, "data": [], "parts": 0}

    def on_part_begin() -> None:
        state["parts"] += 1
        if state["parts"] > MAX_PARTS:
            raise TooManyParts

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        if state["header"].lower() == b"content-disposition":
            _, options = parse_options_header(state["value"])
            state["name"] = options.get(b"name", b"").decode("utf-8", "replace")
        state["header"], state["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["data"].append(data[start:end])

    def on_part_end() -> None:
        if state["name"] is not None and state["name"] not in fields:
            fields[state["name"]] = b"".join(state["data"])
        state["name"], state["data"] = None, []

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    parser = MultipartParser(boundary, callbacks)
    try:
        parser.write(body)
        parser.finalize()
    except TooManyParts:
        raise ApiError(413, f"a form of more than {MAX_PARTS} parts; send the image alone as '{FIELD}'") from None
    except Exception as exc:  # python-multipart raises its own types for malformed bodies
        raise ApiError(400, f"malformed multipart body ({type(exc).__name__})") from None
    return fields


def field_names(fields: dict[str, bytes]) -> str:
    """The first few field names of a form, each cut short: enough to spot a misnamed field, never an echo."""
    shown = [repr(name[:SHOWN_NAME] + ("…" if len(name) > SHOWN_NAME else "")) for name in list(fields)[:SHOWN_NAMES]]
    more = len(fields) - len(shown)
    return (", ".join(shown) or "none") + (f" and {more} more" if more > 0 else "")


def upload_image(body: bytes, content_type: str, limit: int) -> bytes:
    """The image bytes of a request body: the multipart field ``file``, or a raw image body (run off the
    event loop: parsing a form is Python work)."""
    if not body:
        raise ApiError(400, f"empty request: send a chest X-ray (PNG, JPEG, TIFF or DICOM) as the field '{FIELD}'")
    media, options = parse_options_header(content_type)
    media = media.decode("latin-1").lower()
    if media != "multipart/form-data" and media not in RAW_TYPES:
        shown = media[:40] or "no type"
        raise ApiError(415, f"send the image as the multipart field '{FIELD}' (or a raw image body), not {shown}")
    if media == "multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise ApiError(400, "multipart body without a boundary")
        fields = multipart_fields(body, boundary)
        if FIELD not in fields:
            raise ApiError(
                422, f"no field '{FIELD}' in the form (fields sent: {field_names(fields)}); send the image as '{FIELD}'"
            )
        body = fields[FIELD]
        if not body:
            raise ApiError(400, f"the field '{FIELD}' is empty")
    if len(body) > limit:
        raise ApiError(413, f"upload over the limit of {limit // (1024 * 1024)} MB")
    if not looks_like_image(body):  # the signatures a file in a folder is known by, too
        raise ApiError(415, "not a PNG, JPEG, TIFF, BMP, GIF, WebP or DICOM file (judged by its content, not its name)")
    return body


def upload_pixels(body: bytes, draft: int | None) -> int:
    """The pixels decoding an upload will hold, read from its header alone (a JPEG at its draft scale): what
    it costs of the pixel budget. The pixel limit for a header that cannot be read (its decoding then fails
    on its own), and at most the limit (a larger image is refused before it is decoded)."""
    try:
        with Image.open(io.BytesIO(body)) as img:
            if draft and img.format == "JPEG":
                img.draft(img.mode, (draft, draft))
            return min(img.width * img.height, MAX_IMAGE_PIXELS)
    except Exception:  # noqa: BLE001  (not an image Pillow knows: a DICOM, or nothing readable)
        pass
    import pydicom  # only when a DICOM comes (~0.1 s to import)

    try:
        ds = pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True, force=True)
        return min(int(ds.Rows) * int(ds.Columns), MAX_IMAGE_PIXELS)
    except Exception:  # noqa: BLE001  (pydicom reports damaged headers through many exception types)
        return MAX_IMAGE_PIXELS


def decode_upload(body: bytes, draft: int | None = None) -> Image.Image:
    """The decoded image (a large JPEG, or a huge PNG or TIFF, at the reduced scale ``draft`` allows); 413 for
    one over the pixel limit, 400 for anything unreadable."""
    try:
        return decode_bytes(body, "upload", draft)
    except ImageTooLarge as exc:
        raise ApiError(413, str(exc)) from None
    except CovidxrError as exc:
        raise ApiError(400, str(exc)) from None


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # the default level costs more time than the model
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _preview(image: Image.Image) -> Image.Image:
    preview = image.copy()
    preview.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.LANCZOS)
    return preview


def heatmap(cam: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The map in the 'jet' colours, upsampled to ``size``, with no image under it (the page blends it)."""
    resized = np.asarray(Image.fromarray(np.float32(cam)).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    return Image.fromarray(np.uint8(jet(resized) * 255))


def _explained(model: Model, body: bytes) -> dict:
    """Decode, predict and explain one upload, in the explanation lane's thread (decoded at the scale the model
    needs, as predictions are: the map and the overlay are returned at most 512 px anyway)."""
    image = decode_upload(body, model.decode_side)
    [result] = model.explain([image])
    return _response(_size(image), _preview(image), result, True)


def _size(image: Image.Image) -> dict:
    return dict(zip(("width", "height"), image.info.get(FULL_SIZE, image.size), strict=True))


def _response(size: dict, preview: Image.Image | None, result: dict, explain: bool) -> dict:
    """The JSON answer: ``size`` is the file's own, ``preview`` the image shown (None: none asked for)."""
    answer = {
        "label": result["label"],
        "no_answer_reason": result["no_answer_reason"],
        "probabilities": result["probabilities"],
        "decision_note": result.get("decision_note"),
        "weakness": result.get("weakness"),
        "covid_positive": result["covid_positive"],
        "covid_threshold": result["covid_threshold"],
        "threshold_source": result.get("threshold_source"),
        "site": result["site"],
        "out_of_distribution": result["out_of_distribution"],
        "ood_score": result["ood_score"],
        "image": dict(size),
    }
    if preview is None:
        return answer
    answer["image"]["preview_png"] = _png(preview)
    if explain:
        answer["explanation"] = {
            "method": result["method"],
            "target": result["target"],
            "empty": result["map_empty"],  # no class-specific activation: the page says so instead of a map
            "heatmap_png": _png(heatmap(result["map"], preview.size)),
            "overlay_png": _png(_preview(result["overlay"])),
        }
    return answer


def _prepared(
    model: Model, body: bytes, preview_wanted: bool
) -> tuple[dict, Image.Image | None, tuple[np.ndarray, bool, str | None]]:
    """Decode an upload and prepare the model's input (on a decoding thread; 400/413 for a bad upload). The
    decoded image is not kept: only its size, the preview if one is wanted, and the model's input."""
    image = decode_upload(body, model.decode_side)
    return _size(image), _preview(image) if preview_wanted else None, model.prepare(image)


class MicroBatcher:
    """Concurrent predictions answered by one engine call: the requests that arrive within ``wait`` seconds
    of the first, up to ``max_batch``, are stacked into one batch (one onnxruntime session call costs
    far less per image than one call per image). Decoding and preprocessing run before, on their own
    threads, so an unreadable upload is refused there and never joins a batch; should the batched call
    itself fail, its images are answered one by one, so one bad input cannot fail the others."""

    def __init__(
        self, model: Model, executor: ThreadPoolExecutor, max_batch: int = MAX_BATCH, wait: float = BATCH_WAIT
    ):
        self.model, self.executor, self.max_batch, self.wait = model, executor, max_batch, wait
        self.pending: list[tuple[tuple[np.ndarray, bool, str | None], asyncio.Future]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.batch_sizes: list[int] = []  # for /healthz and the tests: how requests were grouped

    async def answer(self, prepared: tuple[np.ndarray, bool, str | None]) -> dict:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.append((prepared, future))
        if len(self.pending) >= self.max_batch:
            self._flush()
        elif self.timer is None:
            self.timer = loop.call_later(self.wait, self._flush)
        return await future

    def _flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        batch, self.pending = self.pending, []
        if not batch:
            return
        self.batch_sizes = [*self.batch_sizes[-99:], len(batch)]
        done = asyncio.get_running_loop().run_in_executor(self.executor, self._run, [item for item, _ in batch])
        done.add_done_callback(lambda finished: self._deliver(batch, finished))

    def _run(self, items: list[tuple[np.ndarray, bool, str | None]]) -> list[dict | Exception]:
        try:
            return list(self.model.answer_prepared(items))
        except Exception:  # answer each alone: only the image that cannot be answered fails
            answers: list[dict | Exception] = []
            for item in items:
                try:
                    answers += self.model.answer_prepared([item])
                except Exception as exc:  # noqa: BLE001  (reported to its own request only)
                    answers.append(exc)
            return answers

    @staticmethod
    def _deliver(batch: list, finished: asyncio.Future) -> None:
        failure = finished.exception()
        answers = [failure] * len(batch) if failure else finished.result()
        for (_, future), result in zip(batch, answers, strict=True):
            if future.done():
                continue  # the client went away
            if isinstance(result, BaseException):
                future.set_exception(ApiError(500, f"the model could not answer this image ({type(result).__name__})"))
            else:
                future.set_result(result)


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform == "linux" else None


def return_memory() -> None:
    """Hand the heap's free pages back to the system: glibc keeps what a burst of large images freed, so
    without this the process stays gigabytes large after the burst is answered."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):  # glibc only (musl has none)
        _LIBC.malloc_trim(0)


def lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value (Linux sets it per thread; elsewhere it would be the whole
    process's, so nothing is changed there)."""
    if sys.platform == "linux":
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))


class PixelBudget:
    """Decoded pixels in flight: memory follows pixels, not upload bytes (a 200 KB PNG can decode to 60 Mpx),
    so an upload is admitted to decoding by its header's pixel count, waits up to ``wait`` seconds for room,
    and gets 503 otherwise. One image is always admitted when nothing else is in flight."""

    def __init__(self, total: int, wait: float):
        self.total, self.wait, self.used = total, wait, 0  # changed on the event loop only
        self.changed = asyncio.Condition()

    @asynccontextmanager
    async def held(self, pixels: int, executor: ThreadPoolExecutor) -> AsyncIterator[None]:
        async with self.changed:
            try:
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: self.used == 0 or self.used + pixels <= self.total), self.wait
                )
            except asyncio.TimeoutError:
                raise ApiError(
                    503, f"busy: {self.used:,} decoded pixels in flight; retry in a moment", {"Retry-After": "1"}
                ) from None
            self.used += pixels
        try:
            yield
        finally:
            async with self.changed:
                self.used -= pixels
                self.changed.notify_all()
            if self.used == 0 or pixels >= TRIM_ABOVE:  # after a burst, or after one large image under load
                asyncio.get_running_loop().run_in_executor(executor, return_memory)


class InferenceQueue:
    """One worker thread for the model, one of lower priority for explanations, and at most ``limit`` requests
    admitted: being received, waiting or answered. Admission comes before the body is read, so a burst of
    large uploads costs at most ``limit`` bodies of memory; the others get 503 without their body ever being
    kept. One client address has at most ``uploads_per_client`` bodies in flight (more wait for one of them
    to end, then get 429), and a body too slow is cut off (408): clients that do not send cannot hold the
    queue."""

    def __init__(self, limit: int, limits: Limits):
        self.limit, self.limits = limit, limits
        self.waiting = 0  # changed on the event loop only, as are the two below
        self.explaining = 0
        self.uploading: dict[str, int] = {}  # bodies being received, per client address
        self.turns = asyncio.Condition()
        self.budget = PixelBudget(limits.pixel_budget, limits.budget_wait)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="covidxr-inference")  # the engine's thread
        # Decoding and preprocessing of uploads (Pillow, pydicom, the lung check release the GIL).
        self.decoders = ThreadPoolExecutor(physical_cores(), thread_name_prefix="covidxr-decode")
        self.explainer = ThreadPoolExecutor(
            1, thread_name_prefix="covidxr-explain", initializer=lower_priority, initargs=(limits.explain_nice,)
        )

    async def _client_slot(self, client: str) -> bool:
        async with self.turns:
            try:
                await asyncio.wait_for(
                    self.turns.wait_for(lambda: self.uploading.get(client, 0) < self.limits.uploads_per_client),
                    self.limits.body_grace,
                )
            except asyncio.TimeoutError:
                return False
            self.uploading[client] = self.uploading.get(client, 0) + 1
            return True

    async def _release_client(self, client: str) -> None:
        async with self.turns:
            self.uploading[client] -= 1
            if not self.uploading[client]:
                del self.uploading[client]
            self.turns.notify_all()

    @asynccontextmanager
    async def admitted(self, request: Request, limit: int, explain: bool) -> AsyncIterator[Any]:
        """Admit a request before its body is read (refused ones get their status after their body is
        discarded); yields the call that says the body has arrived, which frees the client's upload slot."""
        client = request.client.host if request.client else ""
        busy = {"Retry-After": "1"}
        if not await self._client_slot(client):
            await discard_body(request, limit, self.limits)
            most = self.limits.uploads_per_client
            raise ApiError(429, f"too many uploads at once from one address (at most {most}); retry in a moment", busy)
        refusal = None
        if self.waiting >= self.limit:
            refusal = f"{self.waiting} requests are waiting"
        elif explain and self.explaining >= self.limits.max_explains:
            refusal = f"{self.explaining} explanations are running or waiting"
        if refusal:
            await self._release_client(client)
            await discard_body(request, limit, self.limits)
            raise ApiError(503, f"busy: {refusal}; retry in a moment", busy)
        self.waiting += 1
        self.explaining += explain
        uploading = True

        async def received() -> None:
            nonlocal uploading
            if uploading:
                uploading = False
                await self._release_client(client)

        try:
            yield received
        finally:
            await received()
            self.waiting -= 1
            self.explaining -= explain

    async def run(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def decode(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.decoders, function, *args)

    async def explain(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.explainer, function, *args)


def create_app(
    model: Model | ForeignModel,
    max_queue: int = MAX_QUEUE,
    max_upload: int = MAX_UPLOAD,
    monitor_window: int = MONITOR_WINDOW,
    limits: Limits | None = None,
) -> FastAPI:
    """The FastAPI application serving ``model`` (a covidxr run, or a foreign ONNX model: its answers have the same
    keys; ``/api/explain`` then answers with ``explanation`` null, as Grad-CAM needs a covidxr run)."""
    if max_queue < 1 or max_upload < 1:
        raise CovidxrError("--max-queue and the upload limit must be at least 1")
    app = FastAPIOffline(  # /docs with Swagger UI's files served by the app: no CDN, nothing sent elsewhere
        redoc_url=None,  # ReDoc's bundle still fetches its logo from cdn.redoc.ly
        title="covidxr",
        version=__version__,
        description=f"Chest X-ray classification COVID-19 / NORMAL / PNEUMONIA. **{DISCLAIMER}**",
    )
    limits = limits or Limits()
    queue = InferenceQueue(max_queue, limits)
    monitor = LiveMonitor(model, monitor_window)
    site_line = None if model.site is None else describe_site(model.site)
    batcher = MicroBatcher(model, queue.executor)
    identity = model_id(model)
    foreign = isinstance(model, ForeignModel)
    card = model.card() if foreign else model_card(model.run.path)
    card_page = model.card_html() if foreign else render_model_card_html(card)
    web = resources.files("covidxr.runtime") / "web"

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = "; ".join(str(e.get("msg")) for e in exc.errors()[:SHOWN_NAMES]) or "invalid request"
        return _error(422, message[:200])  # short: never the client's input at length

    async def answer(request: Request, explain: bool) -> dict:
        lane = explain and not foreign  # Grad-CAM: the explanation lane
        async with queue.admitted(request, max_upload, lane) as received:  # before the body is read
            body = await read_body(request, max_upload, limits)
            await received()
            content_type = request.headers.get("content-type", "")
            upload = await queue.decode(upload_image, body, content_type, max_upload)
            del body  # the image's bytes alone from here on
            pixels = await queue.decode(upload_pixels, upload, model.decode_side)
            preview = request.query_params.get("preview", "").lower() in {"1", "true", "yes"}
            async with queue.budget.held(pixels, queue.decoders):
                if lane:
                    result = await queue.explain(_explained, model, upload)
                else:
                    size, shown, prepared = await queue.decode(_prepared, model, upload, preview or explain)
                    answered = await batcher.answer(prepared)
            if not lane:
                result = await queue.decode(_response, size, shown, answered, False)
                if explain:  # a foreign model: the answer and its preview, no map
                    result |= {"explanation": None, "explanation_unavailable": NO_EXPLANATION}
            # By the upload's own bytes (hashed off the event loop): the same file as one of the training images.
            digest = None if foreign else await queue.decode(lambda: sha256(upload).hexdigest())
            result["seen_in_training"] = None if foreign else seen_in_training(model.run, digest)
        monitor.add(result)
        return {**result, "site_calibration": site_line, "model": identity, "disclaimer": DISCLAIMER}

    @app.post("/api/predict", openapi_extra={"requestBody": EXAMPLE})
    async def predict(request: Request) -> dict:
        """Label, calibrated probabilities and the out-of-distribution flag of one chest X-ray;
        ``?preview=true`` adds a PNG of the image, at most 512 px (for DICOM, which browsers cannot show)."""
        return await answer(request, explain=False)

    @app.post("/api/explain", openapi_extra={"requestBody": EXAMPLE})
    async def explain(request: Request) -> dict:
        """As ``/api/predict``, plus the Grad-CAM map of the predicted class (a heat map to lay over the
        preview, and the two already blended), as base64 PNGs. A foreign ONNX model (``serve --model MODEL.onnx``)
        has no Grad-CAM: its answer comes with the preview, ``explanation`` null and ``explanation_unavailable``."""
        return await answer(request, explain=True)

    @app.get("/api/model")
    async def model_info() -> dict:
        """The model card: training data, confounders, metrics with intervals, audit, failure modes; and the
        site calibration whose threshold decides, where the service runs with one (``serve --site``)."""
        site = None if model.site is None else {"file": model.site.path, **model.site.to_dict()}
        return {"model": identity, **card, "site": site}

    @app.get("/model-card", response_class=HTMLResponse, include_in_schema=False)
    async def model_card_page() -> HTMLResponse:
        """The model card as a readable page (``/api/model`` is the same as JSON)."""
        return HTMLResponse(card_page)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {
            "status": "ok",
            "model": identity,
            "site": None if model.site is None else model.site.path,
            "site_calibration": site_line,
            "covid_threshold": model.covid_threshold,
            "waiting": queue.waiting,
            "uploading": sum(queue.uploading.values()),
            "explaining": queue.explaining,
            "pixels_in_flight": queue.budget.used,
            "recent_batch_sizes": batcher.batch_sizes,
            "monitor": monitor.status(),
        }

    @app.get("/monitor", response_class=HTMLResponse, include_in_schema=False)
    async def monitor_page() -> HTMLResponse:
        """The live monitor's figures and rules as a page (``/healthz``'s ``monitor`` is the same as JSON)."""
        site = None if model.site is None else f"{model.site.site} ({model.site.path})"
        return HTMLResponse(render_monitor_html(monitor.status(), identity, site))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((web / "index.html").read_text())

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        # A fixed list: nothing from the request reaches the filesystem.
        kinds = {"app.js": "text/javascript", "style.css": "text/css"}
        if name not in kinds:
            raise ApiError(404, "not found")
        return Response((web / name).read_text(), media_type=kinds[name])

    return app


def serve(
    model: Model | ForeignModel, host: str, port: int, max_queue: int = MAX_QUEUE, monitor_window: int = MONITOR_WINDOW
) -> None:
    """Run the service until interrupted (uvicorn, one process: the model is loaded once)."""
    import uvicorn

    app = create_app(model, max_queue, monitor_window=monitor_window)
    uvicorn.run(app, host=host, port=port, log_level="info", server_header=False)
