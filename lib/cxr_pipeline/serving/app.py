"""The prediction service: an upload page and a JSON API over one saved model.

``create_app(model_dir)`` loads the model once (see :mod:`.backends`) and
returns a FastAPI app with

* ``GET /``          the upload page; ``POST /`` shows the result on the page,
* ``POST /predict``  multipart image -> JSON (class, probability, threshold, model id),
* ``GET /health``    liveness, which model is loaded (its id, never its path) and the load,
* ``GET /openapi.json`` the OpenAPI description.

Under load (settings in the ``serving`` section of ``conf/defaults.yaml``):

* at most ``max_receiving`` upload bodies arrive at once (each held in memory,
  at most ``max_upload_mb``); each must keep a pace: after ``body_grace_s``, at
  least ``body_min_kb_s`` on average, or it gets ``408`` and its connection is
  closed. So a stalled or trickling client loses its place within seconds;
* an upload is admitted once its whole body is in: at most
  ``max_active + max_queued`` at once, the next one gets ``503`` with
  ``Retry-After``. A slow body never holds a slot that a working client needs;
* at most ``max_active`` uploads are decoded at once, each decoded once; the
  pixels go to the model's batching thread;
* Grad-CAM maps are drawn on their own thread, at most ``max_heatmaps`` requests
  for them at once, and never hold up plain predictions.

Exposure: only the Host names in ``allowed_hosts`` are served (a DNS-rebinding
page cannot reach a loopback service); with an API token every route but
``/health`` needs ``Authorization: Bearer <token>``. Uploads are held in memory
(Starlette spools parts over 1 MB to an anonymous temporary file that is
removed when the request ends); they are written to disk only when
``keep_uploads`` is on, then under a generated name in ``upload_dir``, mode
0600, within ``upload_quota_mb``.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import config as cfg
from ..models.tensorflow_runtime import import_tensorflow
from .backends import HeatMap, ModelBackend, Prediction, load_backend
from .validation import MIB, CheckedImage, UploadRejected, browser_image, check_upload, describe_size, too_large

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
# Room for the multipart envelope (boundaries, part headers) around the file itself.
MULTIPART_OVERHEAD = 64 * 1024
UPLOAD_PATHS = ("/", "/predict")
DRAIN_LIMIT_FACTOR = 8
# Reachable without the API token: liveness probes (it names the model id and the load, nothing else).
OPEN_PATHS = ("/health",)


# ----------------------------------------------------------------------------
# Settings: the ``serving`` section of the config


@dataclass(frozen=True)
class ServingSettings:
    """``serving.*`` from the loaded config; ``conf/defaults.yaml`` holds every default."""

    host: str
    port: int
    max_upload_mb: float
    keep_uploads: bool
    upload_dir: str | None
    upload_quota_mb: float
    max_batch: int
    max_active: int
    max_queued: int
    max_receiving: int
    body_grace_s: float
    body_min_kb_s: float
    max_heatmaps: int
    retry_after_s: int
    allowed_hosts: list[str]

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, **overrides: Any) -> ServingSettings:
        """From a loaded config (``None``: the defaults); keyword arguments that are not None win."""
        return cfg.section_settings(cls, cfg.load_config() if config is None else config, "serving", **overrides)

    def validate(self) -> None:
        if self.keep_uploads and not self.upload_dir:
            raise cfg.ConfigError("serving.keep_uploads is on but serving.upload_dir is not set")
        for name, low in (("max_upload_mb", 0), ("upload_quota_mb", 0), ("body_grace_s", 0), ("body_min_kb_s", 0)):
            if not float(getattr(self, name)) > low:
                raise cfg.ConfigError(f"serving.{name} must be > {low}, got {getattr(self, name)!r}")
        for name, low in (
            ("max_batch", 1),
            ("max_active", 1),
            ("max_queued", 0),
            ("max_receiving", 1),
            ("max_heatmaps", 1),
            ("retry_after_s", 1),
        ):
            if int(getattr(self, name)) < low:
                raise cfg.ConfigError(f"serving.{name} must be >= {low}, got {getattr(self, name)!r}")
        if isinstance(self.allowed_hosts, str) or not self.allowed_hosts:
            raise cfg.ConfigError("serving.allowed_hosts must be a non-empty list of host names ('*' = any)")

    @property
    def max_bytes(self) -> int:
        return int(float(self.max_upload_mb) * MIB)

    @property
    def max_admitted(self) -> int:
        return int(self.max_active) + int(self.max_queued)

    @property
    def pace(self) -> BodyPace:
        return BodyPace(float(self.body_grace_s), float(self.body_min_kb_s) * 1024)


# ----------------------------------------------------------------------------
# API schema (what /openapi.json describes)


class ModelDescription(BaseModel):
    model_id: str = Field(description="run name @ short hash of the exported model")
    kind: str = Field(description="spark-lr (Spark pipeline export) or cnn (Keras CNN)")
    name: str
    label_names: list[str]
    threshold: float


class PredictionResponse(BaseModel):
    class_: str = Field(alias="class", description="predicted class name, e.g. PNEUMONIA")
    label: int = Field(description="predicted class index (NORMAL=0, PNEUMONIA=1)")
    probability: float = Field(description="probability of the positive class (label 1)")
    threshold: float = Field(description="probability at or above which label 1 is predicted")
    model_id: str
    model: ModelDescription
    heatmap_png_base64: str | None = Field(None, description="Grad-CAM overlay (CNN models, ?heatmap=true)")
    heatmap_flat: bool | None = Field(None, description="true: the Grad-CAM map is flat, no region stands out")
    heatmap_error: str | None = Field(
        None, description="why no heat map came back when one was asked for (e.g. the model has none)"
    )

    model_config = {"populate_by_name": True}


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong with the upload, for a person")
    code: str = Field(
        description="empty_upload | too_large | not_an_image | corrupt_image | missing_file | "
        "invalid_request | upload_too_slow | busy | host_not_allowed | unauthorized"
    )


class BatchingStats(BaseModel):
    max_batch: int = Field(description="most concurrent requests scored in one model call")
    largest_batch: int = Field(description="largest batch seen since start-up")
    model_calls: int
    images_scored: int


class LoadStats(BaseModel):
    max_active: int = Field(description="uploads decoded at once")
    max_queued: int = Field(description="uploads admitted beyond max_active; more get 503")
    max_receiving: int = Field(description="upload bodies arriving at once; more get 503")
    max_heatmaps: int = Field(description="Grad-CAM requests admitted at once; more get 503")
    receiving: int = Field(description="upload bodies arriving now (not yet admitted)")
    peak_receiving: int
    in_flight: int = Field(description="uploads admitted now (whole body in; being decoded, scored or answered)")
    peak_in_flight: int
    heatmaps_in_flight: int
    busy_rejections: int = Field(description="503 answers since start-up")
    slow_rejections: int = Field(description="408 answers since start-up: bodies that fell behind the minimum pace")


class HealthResponse(BaseModel):
    status: str
    model: ModelDescription
    batching: BatchingStats | None = None
    load: LoadStats


UPLOAD_ERRORS = {
    400: {"model": ErrorResponse, "description": "empty upload, or a Host name not in serving.allowed_hosts"},
    401: {"model": ErrorResponse, "description": "missing or wrong API token (when the service has one)"},
    408: {
        "model": ErrorResponse,
        "description": "the upload arrived slower than serving.body_min_kb_s (after serving.body_grace_s); "
        "the connection is closed",
    },
    413: {"model": ErrorResponse, "description": "file over the size limit"},
    415: {"model": ErrorResponse, "description": "not an image"},
    422: {
        "model": ErrorResponse,
        "description": "corrupt or truncated image (corrupt_image), or no file part (missing_file)",
    },
    503: {"model": ErrorResponse, "description": "busy: too many uploads at once; retry after the Retry-After seconds"},
}


# ----------------------------------------------------------------------------
# Middleware: Host check, API token, the body (413, 408, 503), admission (503)


def host_name(header: str) -> str:
    """The name part of a Host header: ``[::1]:8000`` -> ``::1``, ``Example.org.:80`` -> ``example.org``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    if header.count(":") == 1:
        header = header.split(":", 1)[0]
    return header.rstrip(".")


class HostCheck:
    """ASGI middleware: only requests whose Host names a served host get through.

    A DNS-rebinding page (evil.example resolving to 127.0.0.1) sends ``Host:
    evil.example``: refused, so the page cannot use the loopback service.
    """

    def __init__(self, app: ASGIApp, allowed: list[str]):
        self.app = app
        self.any = "*" in allowed
        self.allowed = {host_name(str(h)) for h in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.any:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if host_name(header) in self.allowed:
            await self.app(scope, receive, send)
            return
        rejection = UploadRejected(
            400,
            "host_not_allowed",
            f"Host {header!r} is not served here; the service "
            "answers the names in serving.allowed_hosts (add yours there).",
        )
        await JSONResponse(rejection.as_json(), status_code=400)(scope, receive, send)


class BearerToken:
    """ASGI middleware: every path but ``/health`` needs ``Authorization: Bearer <token>``."""

    def __init__(self, app: ASGIApp, token: str):
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):  # constant time: the compare leaks no prefix length
            await self.app(scope, receive, send)
            return
        rejection = UploadRejected(
            401, "unauthorized", "This service needs an API token: send the header " "'Authorization: Bearer <token>'."
        )
        await JSONResponse(rejection.as_json(), status_code=401, headers={"WWW-Authenticate": "Bearer"})(
            scope, receive, send
        )


@dataclass
class LoadCounters:
    """What /health reports about the load; changed on the event loop only (no lock needed)."""

    receiving: int = 0
    peak_receiving: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    heatmaps_in_flight: int = 0
    busy_rejections: int = 0
    slow_rejections: int = 0


def is_upload(scope: Scope) -> bool:
    return scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in UPLOAD_PATHS


class BodyTooSlow(Exception):
    """The request body fell behind its :class:`BodyPace`."""


@dataclass(frozen=True)
class BodyPace:
    """The pace a request body keeps: after ``grace_s``, at least ``min_rate`` bytes/s on average.

    Each byte received moves the body's deadline ``1 / min_rate`` s further: a client that keeps
    sending keeps its place, one that stalls loses it once its average falls below ``min_rate``.
    """

    grace_s: float
    min_rate: float  # bytes per second


class PacedReceive:
    """``receive`` under a :class:`BodyPace`: raises :class:`BodyTooSlow` once the body falls behind."""

    def __init__(self, receive: Receive, pace: BodyPace):
        self.receive, self.pace = receive, pace
        self.start = time.monotonic()
        self.received = 0

    async def __call__(self) -> Message:
        left = self.start + self.pace.grace_s + self.received / self.pace.min_rate - time.monotonic()
        if left <= 0:
            raise BodyTooSlow
        try:
            message = await asyncio.wait_for(self.receive(), left)
        except TimeoutError:
            raise BodyTooSlow from None
        self.received += len(message.get("body", b""))
        return message

    def too_slow(self) -> UploadRejected:
        seconds = time.monotonic() - self.start
        return UploadRejected(
            408,
            "upload_too_slow",
            f"The upload arrived too slowly ({describe_size(self.received)} in {seconds:.0f} s; the service "
            f"needs {self.pace.min_rate / 1024:g} kB/s after the first {self.pace.grace_s:g} s): "
            "send it again over a faster connection.",
        )


class ClientGone(Exception):
    """The client disconnected before its body was in."""


class BodyReceiver:
    """ASGI middleware: an upload's whole body is read, at a minimum pace and within the size limit,
    before the app (and admission) sees the request.

    * a Content-Length over ``max_body`` gets 413 at once; a chunked body is counted as it arrives;
    * at most ``limit`` bodies arrive at once (each is held in memory); the next upload gets 503;
    * a body that falls behind ``pace`` gets 408 and its connection is closed, so a stalled or
      trickling client gives up its place within ``pace.grace_s`` of stalling (at the start).
    The body then reaches the app as it arrived, one message per piece.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        pace: BodyPace,
        max_body: int,
        max_file: int,
        retry_after_s: int,
        counters: LoadCounters,
        reject: Callable[[Scope, UploadRejected], Response],
    ):
        self.app, self.limit, self.pace, self.counters, self.reject = app, limit, pace, counters, reject
        self.max_body, self.max_file, self.retry_after_s = max_body, max_file, retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_upload(scope):
            await self.app(scope, receive, send)
            return
        paced = PacedReceive(receive, self.pace)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await self.refuse_unread(scope, paced, send, too_large(int(declared), self.max_file))
            return
        counters = self.counters
        if counters.receiving >= self.limit:
            counters.busy_rejections += 1
            rejection = busy(f"{counters.receiving} uploads are arriving", self.retry_after_s)
            await self.refuse_unread(scope, paced, send, rejection)
            return
        counters.receiving += 1
        counters.peak_receiving = max(counters.peak_receiving, counters.receiving)
        try:
            body: list[Message] | UploadRejected = await self.read_body(paced)
        except UploadRejected as rejection:
            body = rejection
        except ClientGone:
            return
        finally:
            counters.receiving -= 1
        if isinstance(body, UploadRejected):
            await self.answer(scope, send, body, close=True)
            return
        await self.app(scope, replay(body, receive), send)

    async def read_body(self, paced: PacedReceive) -> list[Message]:
        """The body's messages; :class:`UploadRejected` (408, 413) or :class:`ClientGone` if it cannot be had."""
        messages, size = [], 0
        while True:
            try:
                message = await paced()
            except BodyTooSlow:
                self.counters.slow_rejections += 1
                raise paced.too_slow() from None
            if message["type"] != "http.request":
                raise ClientGone
            size += len(message.get("body", b""))
            if size > self.max_body:
                raise too_large(None, self.max_file)
            messages.append(message)
            if not message.get("more_body", False):
                return messages

    async def refuse_unread(self, scope: Scope, paced: PacedReceive, send: Send, rejection: UploadRejected) -> None:
        """Answer without keeping the body; the connection is closed unless the whole body could be drained."""
        drained = await drain(paced, limit=DRAIN_LIMIT_FACTOR * self.max_body)
        await self.answer(scope, send, rejection, close=not drained)

    async def answer(self, scope: Scope, send: Send, rejection: UploadRejected, close: bool) -> None:
        response = self.reject(scope, rejection)
        if close:  # the rest of the body is never read: the connection cannot carry another request
            response.headers["Connection"] = "close"
        await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def replay(body: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` (dropping each message as it goes), then the client's own."""

    async def replaying() -> Message:
        return body.pop(0) if body else await receive()

    return replaying


class Admission:
    """ASGI middleware: at most ``limit`` uploads in flight; the next one gets 503 + Retry-After at once.

    Placed after :class:`BodyReceiver`: an upload is counted once its whole body is in, so a slow
    body never holds a slot; the slot is held until the answer is written.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        retry_after_s: int,
        counters: LoadCounters,
        reject: Callable[[Scope, UploadRejected], Response],
    ):
        self.app, self.limit, self.retry_after_s, self.counters = app, limit, retry_after_s, counters
        self.reject = reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_upload(scope):
            await self.app(scope, receive, send)
            return
        counters = self.counters
        if counters.in_flight >= self.limit:
            counters.busy_rejections += 1
            rejection = busy(f"{counters.in_flight} uploads are in progress", self.retry_after_s)
            await self.reject(scope, rejection)(scope, receive, send)
            return
        counters.in_flight += 1
        counters.peak_in_flight = max(counters.peak_in_flight, counters.in_flight)
        try:
            await self.app(scope, receive, send)
        finally:
            counters.in_flight -= 1


def busy(reason: str, retry_after_s: int) -> UploadRejected:
    return UploadRejected(503, "busy", f"The service is busy ({reason}): try again in {retry_after_s} s.")


async def drain(receive: Receive, limit: int) -> bool:
    """Read (and drop) what the client is sending so it sees the answer rather than a reset
    connection. True once the body is all in; False past ``limit`` bytes, when the client
    left, or when a paced ``receive`` finds the body too slow."""
    seen = 0
    try:
        while seen <= limit:
            message = await receive()
            if message["type"] != "http.request":
                return False
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
    except BodyTooSlow:
        return False
    return False


# ----------------------------------------------------------------------------
# Decoding (once per upload) and keeping uploads


def decode_upload(
    data: bytes, max_bytes: int, size: tuple[int, int], max_pixels: int | None, intensity: str = "none"
) -> tuple[CheckedImage, np.ndarray]:
    """``(description, pixels at the model's size)``, or :class:`UploadRejected` with validation's verdict.

    An accepted upload is decoded once, here (the model, Grad-CAM and the
    page use these pixels); :func:`.validation.check_upload` is asked only about
    bytes the decoder refuses, for its status and message.
    """
    from cxr_pipeline.images.decode import ImageDecodeError, configured_max_pixels, decode_image, image_info

    max_pixels = configured_max_pixels(max_pixels)
    if not data or len(data) > max_bytes:
        check_upload(data, max_bytes, size=size, max_pixels=max_pixels)  # raises: empty / too large
    try:
        pixels = decode_image(data, size=size, max_pixels=max_pixels, intensity=intensity)
        width, height, fmt = image_info(data, max_pixels)
    except ImageDecodeError as err:
        check_upload(data, max_bytes, size=size, max_pixels=max_pixels)  # raises validation's verdict
        raise UploadRejected(422, "corrupt_image", f"The image could not be read ({err}).") from err
    return CheckedImage(format=fmt.lower(), width=width, height=height), pixels


class UploadKeeper:
    """Saves accepted uploads (mode 0600, generated names) while ``upload_dir`` holds under ``quota_bytes``.

    Never raises: a full quota or a failed write is logged, and the prediction is answered all the same.
    """

    def __init__(self, folder: Path, quota_bytes: int):
        self.folder, self.quota_bytes = Path(folder), int(quota_bytes)
        self._lock = threading.Lock()
        self._used: int | None = None  # bytes in the folder, counted on first use
        self.saved = self.skipped = 0

    def keep(self, data: bytes, checked: CheckedImage, prediction: Prediction, model_id: str) -> Path | None:
        stem = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}"
        if checked.format == "dicom":  # never the DICOM itself: its header holds names and birth dates
            try:
                data, _ = browser_image(data, checked, max_side=max(checked.width, checked.height))
            except Exception:  # noqa: BLE001 - keeping is best effort, the prediction is answered anyway
                self.skipped += 1
                log.exception("upload not kept: the DICOM could not be rendered to PNG")
                return None
            checked = CheckedImage(format="png", width=checked.width, height=checked.height)
        image_path = self.folder / f"{stem}.{'jpeg' if checked.format == 'jpeg' else checked.format or 'img'}"
        record = json.dumps(
            {
                "model_id": model_id,
                "label_name": prediction.label_name,
                "probability": prediction.probability,
                "threshold": prediction.threshold,
                "width": checked.width,
                "height": checked.height,
            },
            indent=1,
        ).encode()
        size = len(data) + len(record)
        try:
            with self._lock:
                used = self._used if self._used is not None else self._count()
                if used + size > self.quota_bytes:
                    self.skipped += 1
                    log.warning(
                        "upload not kept: %s would pass serving.upload_quota_mb (%d of %d bytes used)",
                        self.folder,
                        used,
                        self.quota_bytes,
                    )
                    return None
                self._used = used + size
            write_private(image_path, data)
            write_private(self.folder / f"{stem}.json", record)
        except OSError:
            self.skipped += 1
            log.exception("upload not kept: writing under %s failed; the prediction is answered anyway", self.folder)
            return None
        self.saved += 1
        return image_path

    def _count(self) -> int:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())


def write_private(path: Path, data: bytes) -> None:
    """A new file readable by the service's user only (0600 whatever the umask); never overwrites."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


# ----------------------------------------------------------------------------
# The app


@dataclass
class Scored:
    checked: CheckedImage
    prediction: Prediction
    heatmap: HeatMap | None
    heatmap_error: str | None = None  # why no heat map, when one was asked for
    shown: tuple[bytes, str] | None = None  # (bytes, mime) of the picture a browser shows, when asked for


# Why a heat map asked for did not come back (the JSON's heatmap_error and the page): never the
# exception's own text, which could quote the upload.
HEATMAP_FAILED = "the heat map could not be drawn for this image (the service's log has the details)"


def create_app(
    model_dir: str | Path | None = None,
    *,
    backend: ModelBackend | None = None,
    config: Mapping[str, Any] | None = None,
    api_token: str | None = None,
    **serving: Any,
) -> FastAPI:
    """The service for the model in ``model_dir`` (or an already loaded ``backend``).

    ``config`` is a loaded project config (its ``serving`` section and
    ``data.max_pixels`` are used; ``None``: the defaults); keyword arguments
    override ``serving.*`` keys (``max_upload_mb=0.1``, ``keep_uploads=True``...).
    ``api_token``: when set, every route but ``/health`` needs it as a bearer token.
    """
    config = cfg.load_config() if config is None else config
    settings = ServingSettings.from_config(config, **serving)
    if backend is None:
        if model_dir is None:
            raise ValueError("create_app needs model_dir or backend")
        import_tensorflow()  # before the model loads Keras: its start-up notices stay off the console
        backend = load_backend(model_dir, max_batch=settings.max_batch)
    info = backend.info
    input_size = backend.input_size
    # The model's own decompression-bomb guard, as the batch job applies it.
    max_pixels = backend.max_pixels or cfg.require(config, "data.max_pixels")
    keeper = (
        UploadKeeper(Path(settings.upload_dir), int(settings.upload_quota_mb * MIB)) if settings.keep_uploads else None
    )

    app = FastAPI(
        title="Chest X-ray pneumonia classifier",
        version="1.0",
        description=(
            f"Serves model `{info.model_id}` ({info.name}). POST a chest X-ray (JPEG, PNG or DICOM, at most "
            f"{settings.max_upload_mb:g} MB) to /predict. Upload page at /."
        ),
        docs_url=None,  # Swagger UI / ReDoc pull their assets from a CDN; the machine is offline
        redoc_url=None,
    )
    app.state.backend = backend
    app.state.settings = settings
    app.state.keeper = keeper
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["prob"] = format_probability
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def render_page(request: Request | None, status_code: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("result", None)
        context.setdefault("error", None)
        context.update(info=info, max_upload_mb=settings.max_upload_mb)
        return templates.TemplateResponse(request, "index.html", context, status_code=status_code)

    def reject_response(scope: Scope, rejection: UploadRejected) -> Response:
        if scope["path"] == "/":
            response: Response = render_page(Request(scope), status_code=rejection.status_code, error=rejection)
        else:
            response = JSONResponse(rejection.as_json(), status_code=rejection.status_code)
        if rejection.status_code == 503:
            response.headers["Retry-After"] = str(settings.retry_after_s)
        return response

    # Added innermost first: a request meets HostCheck, then the token, then the body, then admission.
    counters = LoadCounters()
    app.state.load = counters
    app.add_middleware(
        Admission,
        limit=settings.max_admitted,
        retry_after_s=int(settings.retry_after_s),
        counters=counters,
        reject=reject_response,
    )
    app.add_middleware(
        BodyReceiver,
        limit=int(settings.max_receiving),
        pace=settings.pace,
        max_body=settings.max_bytes + MULTIPART_OVERHEAD,
        max_file=settings.max_bytes,
        retry_after_s=int(settings.retry_after_s),
        counters=counters,
        reject=reject_response,
    )
    if api_token:
        app.add_middleware(BearerToken, token=api_token)
    app.add_middleware(HostCheck, allowed=list(settings.allowed_hosts))
    decode_slots = LoopLocal(lambda: asyncio.Semaphore(int(settings.max_active)))

    no_heatmap = None if backend.supports_heatmap else f"this model ({info.kind}) has no heat map: Grad-CAM needs a CNN"

    async def score(data: bytes, with_heatmap: bool, show: bool = False) -> Scored:
        """Decode, score, and when asked draw the heat map and the picture a browser shows."""
        draw = with_heatmap and backend.supports_heatmap
        if draw and counters.heatmaps_in_flight >= int(settings.max_heatmaps):
            counters.busy_rejections += 1
            raise busy(f"{counters.heatmaps_in_flight} heat maps are being drawn", int(settings.retry_after_s))
        counters.heatmaps_in_flight += draw
        try:
            async with decode_slots.get():  # at most max_active decodes at once
                checked, pixels = await run_in_threadpool(
                    decode_upload, data, settings.max_bytes, input_size, max_pixels, backend.intensity
                )
                # The heat map is drawn over what the browser shows: a DICOM or 16-bit PNG only as a PNG copy.
                shown = await run_in_threadpool(browser_image, data, checked) if show or draw else None
            prediction = await asyncio.wrap_future(backend.submit(pixels))
            heatmap, heatmap_error = await draw_heatmap(pixels, shown[0]) if draw else (None, None)
        finally:
            counters.heatmaps_in_flight -= draw
        if with_heatmap and not draw:
            heatmap_error = no_heatmap
        if keeper is not None:
            await run_in_threadpool(keeper.keep, data, checked, prediction, info.model_id)
        return Scored(checked, prediction, heatmap, heatmap_error, shown if show else None)

    async def draw_heatmap(pixels: np.ndarray, picture: bytes) -> tuple[HeatMap | None, str | None]:
        """``(heat map, None)``, or ``(None, why not)`` when Grad-CAM failed: the prediction stands without it."""
        try:
            return await asyncio.wrap_future(backend.submit_heatmap(pixels, picture)), None
        except Exception:  # noqa: BLE001 - the prediction stands without its explanation
            log.exception("Grad-CAM failed for %s; answering without a heat map", info.model_id)
            return None, HEATMAP_FAILED

    async def read_upload(file: UploadFile | None) -> bytes:
        if file is None:
            return b""
        try:
            # One byte past the limit is enough to know it is over.
            return await file.read(settings.max_bytes + 1)
        finally:
            await file.close()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        if any(tuple(err.get("loc", ()))[-1:] == ("file",) for err in errors):
            rejection = UploadRejected(
                422, "missing_file", "No image in the request: send it as the multipart field 'file'."
            )
        else:
            problems = "; ".join(f"{'.'.join(map(str, err.get('loc', ())))}: {err.get('msg')}" for err in errors)
            rejection = UploadRejected(422, "invalid_request", f"Invalid request ({problems}).")
        return reject_response(request.scope, rejection)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(request: Request) -> HTMLResponse:
        return render_page(request)

    @app.post("/", response_class=HTMLResponse, include_in_schema=False)
    async def page_predict(request: Request, file: UploadFile | None = File(None)) -> Response:
        # The client's file name is never shown: a PACS export is often named after the patient.
        data = await read_upload(file)
        try:
            scored = await score(data, True, show=True)
        except UploadRejected as rejection:
            return reject_response(request.scope, rejection)
        return render_page(
            request,
            result=scored.prediction,
            checked=scored.checked,
            image_uri=data_uri(*scored.shown),
            heatmap_uri=data_uri(scored.heatmap.png, "image/png") if scored.heatmap else None,
            heatmap_flat=bool(scored.heatmap and scored.heatmap.flat),
            heatmap_error=scored.heatmap_error,
        )

    @app.post(
        "/predict",
        response_model=PredictionResponse,
        response_model_by_alias=True,
        responses=UPLOAD_ERRORS,
        summary="Classify one chest X-ray",
    )
    async def predict(
        file: UploadFile = File(..., description="the image (JPEG, PNG or DICOM)"),
        heatmap: bool = Query(False, description="add a Grad-CAM overlay PNG (CNN models only)"),
    ) -> Any:
        data = await read_upload(file)
        try:
            scored = await score(data, heatmap)
        except UploadRejected as rejection:
            return reject_response({"type": "http", "path": "/predict"}, rejection)
        return prediction_json(scored, info)

    @app.get("/health", response_model=HealthResponse, summary="Liveness, the loaded model and the load")
    async def health() -> dict[str, Any]:
        stats = getattr(backend, "batching_stats", None)
        return {
            "status": "ok",
            "model": info.as_dict(),
            "batching": stats() if stats else None,
            "load": {
                "max_active": settings.max_active,
                "max_queued": settings.max_queued,
                "max_receiving": settings.max_receiving,
                "max_heatmaps": settings.max_heatmaps,
                **asdict(counters),
            },
        }

    return app


class LoopLocal:
    """One value per running event loop (an asyncio primitive belongs to the loop it was made in)."""

    def __init__(self, factory: Callable[[], Any]):
        self.factory, self._loop, self._value = factory, None, None

    def get(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._value = loop, self.factory()
        return self._value


def format_probability(p: float) -> str:
    """4 decimals, or 2 significant digits below 1e-4 (so a tiny probability does not read as 0)."""
    return f"{p:.4f}" if p == 0 or abs(p) >= 1e-4 else f"{p:.1e}"


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def prediction_json(scored: Scored, info) -> dict[str, Any]:
    p = scored.prediction
    return {
        "class": p.label_name,
        "label": p.label_index,
        "probability": p.probability,
        "threshold": p.threshold,
        "model_id": info.model_id,
        "model": info.as_dict(),
        "heatmap_png_base64": base64.b64encode(scored.heatmap.png).decode("ascii") if scored.heatmap else None,
        "heatmap_flat": scored.heatmap.flat if scored.heatmap else None,
        "heatmap_error": scored.heatmap_error,
    }
