"""The web service behind ``covidxr serve``: a page for the reading room and a JSON API, over one model.

- **One model per process**, loaded before the server starts; inference runs in one worker thread (the
  engine already uses every core), so the event loop keeps answering. At most ``max_queue`` requests
  are admitted (being received or waiting for it): one more gets HTTP 503 with ``Retry-After`` before
  its body is read, never a pile-up of uploads in memory.
- **Privacy.** Uploads are read into memory by the app itself (never spooled to a temporary file),
  limited to ``max_upload`` bytes before anything is decoded, type-checked by their first bytes, and
  never logged; the answer holds no DICOM tag, and no part of a request ever names a file to open.
  CORS is off: browsers only let the page's own origin call the API.
- Every answer that carries a prediction carries the research-use disclaimer.
"""

from __future__ import annotations

import asyncio
import base64
import io
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
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
from covidxr.runtime.images import FULL_SIZE, decode_bytes
from covidxr.runtime.live_monitor import MONITOR_WINDOW, LiveMonitor, render_monitor_html
from covidxr.runtime.runners import head_digest
from covidxr.runtime.site import describe_site
from covidxr.runtime.source import looks_like_image

__all__ = ["create_app", "serve"]

MAX_UPLOAD = 30 * 1024 * 1024  # bytes of image per request
MAX_QUEUE = 32  # requests admitted (being received or waiting for the model) before the next gets 503
PREVIEW_SIDE = 512  # the longest side of the images returned for display
MAX_BATCH = 32  # concurrent predictions answered by one engine call
BATCH_WAIT = 0.005  # seconds a prediction waits for others to join its batch
FIELD = "file"  # the multipart field that carries the image
# What an upload may be, recognised by its first bytes (its name and Content-Type are only claims).
RAW_TYPES = {"image/png", "image/jpeg", "image/tiff", "image/bmp", "application/dicom", "application/octet-stream"}
EXAMPLE = {"content": {"multipart/form-data": {"schema": {"type": "object", "required": [FIELD], "properties": {
    FIELD: {"type": "string", "format": "binary", "description": "PNG, JPEG, TIFF, BMP or DICOM, at most 30 MB"}
}}}}, "required": True}  # fmt: skip


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


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 beyond ``limit`` (an oversized body is read and discarded,
    up to four times the limit, so the client can read the answer rather than lose its connection)."""
    declared = request.headers.get("content-length")
    too_large = ApiError(413, f"upload over the limit of {limit // (1024 * 1024)} MB")
    if declared and declared.isdigit() and int(declared) > 4 * limit:
        raise too_large
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > 4 * limit:
            raise too_large
        if size <= limit + 64 * 1024:  # room for the multipart framing around the image
            body += chunk
    if size > limit + 64 * 1024:
        raise too_large
    return bytes(body)


async def discard_body(request: Request, limit: int) -> None:
    """Receive a refused request's body without keeping it (so the client can read the answer rather
    than lose its connection); nothing is received when the client waits for ``100 Continue`` or the
    body is over four times ``limit``, whose connection is then closed after the answer."""
    declared = request.headers.get("content-length", "")
    waits = request.headers.get("expect", "").lower() == "100-continue"
    if waits or (declared.isdigit() and int(declared) > 4 * limit):
        return
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > 4 * limit:
            return


def multipart_fields(body: bytes, boundary: bytes) -> dict[str, bytes]:
    """Every field of a multipart/form-data body, parsed in memory (the first value of each name)."""
    fields: dict[str, bytes] = {}
    state: dict[str, Any] = {"header": b"", "value": b"", "name": None, "data": []}

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
    except Exception as exc:  # python-multipart raises its own types for malformed bodies
        raise ApiError(400, f"malformed multipart body ({type(exc).__name__})") from None
    return fields


async def read_upload(request: Request, limit: int) -> bytes:
    """The image bytes of a request: the multipart field ``file``, or a raw image body."""
    body = await read_body(request, limit)
    if not body:
        raise ApiError(400, f"empty request: send a chest X-ray (PNG, JPEG, TIFF or DICOM) as the field '{FIELD}'")
    media, options = parse_options_header(request.headers.get("content-type", ""))
    media = media.decode("latin-1").lower()
    if media != "multipart/form-data" and media not in RAW_TYPES:
        raise ApiError(
            415, f"send the image as the multipart field '{FIELD}' (or a raw image body), not {media or 'no type'}"
        )
    if media == "multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise ApiError(400, "multipart body without a boundary")
        fields = multipart_fields(body, boundary)
        if FIELD not in fields:
            named = ", ".join(repr(name) for name in fields) or "none"
            raise ApiError(422, f"no field '{FIELD}' in the form (fields sent: {named}); send the image as '{FIELD}'")
        body = fields[FIELD]
        if not body:
            raise ApiError(400, f"the field '{FIELD}' is empty")
    if len(body) > limit:
        raise ApiError(413, f"upload over the limit of {limit // (1024 * 1024)} MB")
    if not looks_like_image(body):  # the signatures a file in a folder is known by, too
        raise ApiError(415, "not a PNG, JPEG, TIFF, BMP, GIF, WebP or DICOM file (judged by its content, not its name)")
    return body


def decode_upload(body: bytes, draft: int | None = None) -> Image.Image:
    """The decoded image (a large JPEG at the reduced scale ``draft`` allows); 413 for one over the pixel
    limit, 400 for anything unreadable."""
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


def _explained(model: Model, body: bytes, preview_wanted: bool) -> dict:
    """Decode, predict and explain one upload (in the model's thread: Grad-CAM needs the engine)."""
    image = decode_upload(body)
    [result] = model.explain([image])
    return _response(image, result, True, preview_wanted)


def _response(image: Image.Image, result: dict, explain: bool, preview_wanted: bool) -> dict:
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
        "image": dict(zip(("width", "height"), image.info.get(FULL_SIZE, image.size), strict=True)),
    }
    if not (explain or preview_wanted):
        return answer
    preview = _preview(image)
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


def _prepared(model: Model, body: bytes) -> tuple[Image.Image, tuple[np.ndarray, bool, str | None]]:
    """Decode an upload and prepare the model's input (on a decoding thread; 400/413 for a bad upload)."""
    image = decode_upload(body, model.decode_side)
    return image, model.prepare(image)


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


class InferenceQueue:
    """One worker thread for the model, and at most ``limit`` requests admitted: being received, waiting
    or answered. Admission comes before the body is read, so a burst of large uploads costs at most
    ``limit`` bodies of memory; the others get 503 without their body ever being kept."""

    def __init__(self, limit: int):
        self.limit = limit
        self.waiting = 0  # changed on the event loop only
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="covidxr-inference")  # the engine's thread
        # Decoding and preprocessing of uploads (Pillow, pydicom, the lung check release the GIL).
        self.decoders = ThreadPoolExecutor(physical_cores(), thread_name_prefix="covidxr-decode")

    @asynccontextmanager
    async def admitted(self, request: Request, limit: int):
        if self.waiting >= self.limit:
            await discard_body(request, limit)
            raise ApiError(503, f"busy: {self.waiting} requests are waiting; retry in a moment", {"Retry-After": "1"})
        self.waiting += 1
        try:
            yield
        finally:
            self.waiting -= 1

    async def run(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def decode(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.decoders, function, *args)


def create_app(
    model: Model | ForeignModel,
    max_queue: int = MAX_QUEUE,
    max_upload: int = MAX_UPLOAD,
    monitor_window: int = MONITOR_WINDOW,
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
    queue = InferenceQueue(max_queue)
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
        return _error(422, "; ".join(str(e.get("msg")) for e in exc.errors()) or "invalid request")

    async def answer(request: Request, explain: bool) -> dict:
        async with queue.admitted(request, max_upload):  # before the body is read: a 503 costs no memory
            body = await read_upload(request, max_upload)
            preview = request.query_params.get("preview", "").lower() in {"1", "true", "yes"}
            if explain and not foreign:
                result = await queue.run(_explained, model, body, preview)
            else:
                image, prepared = await queue.decode(_prepared, model, body)
                answered = await batcher.answer(prepared)
                result = await queue.decode(_response, image, answered, False, preview or explain)
                if explain:  # a foreign model: the answer and its preview, no map
                    result |= {"explanation": None, "explanation_unavailable": NO_EXPLANATION}
            # By the upload's own bytes (hashed off the event loop): the same file as one of the training images.
            digest = None if foreign else await queue.decode(lambda: sha256(body).hexdigest())
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
