"""The prediction service: an upload page and a JSON API over one saved model.

``create_app(model_dir)`` loads the model once (see :mod:`.backends`) and
returns a FastAPI app with

* ``GET /``          the upload page; ``POST /`` shows the result on the page,
* ``POST /predict``  multipart image -> JSON (class, probability, threshold, model id),
* ``GET /health``    liveness plus which model is loaded,
* ``GET /openapi.json`` the OpenAPI description.

Uploads are held in memory (Starlette spools parts over 1 MB to an anonymous
temporary file that is removed when the request ends); they are written to
disk only when ``keep_uploads`` is on, and then under a generated name in
``upload_dir``, never under the name or path the client sent.
"""
from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .backends import HeatMap, ModelBackend, Prediction, PredictionError, load_backend
from .validation import MIB, CheckedImage, UploadRejected, browser_image, check_upload, too_large

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SERVING_DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 8000,
    "max_upload_mb": 10,
    "keep_uploads": False,
    "upload_dir": None,
    "max_batch": 8,
}
# Room for the multipart envelope (boundaries, part headers) around the file itself.
MULTIPART_OVERHEAD = 64 * 1024
UPLOAD_PATHS = ("/", "/predict")
DRAIN_LIMIT_FACTOR = 8


# ----------------------------------------------------------------------------
# API schema (what /openapi.json describes)


class ModelDescription(BaseModel):
    model_id: str = Field(description="run name @ short hash of the exported model")
    kind: str = Field(description="spark-lr (Spark pipeline export) or cnn (Keras CNN)")
    name: str
    run: str = Field(description="the run folder (or .keras file) the service loaded")
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

    model_config = {"populate_by_name": True}


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong with the upload, for a person")
    code: str = Field(description="empty_upload | too_large | not_an_image | corrupt_image | missing_file | invalid_request")


class BatchingStats(BaseModel):
    max_batch: int = Field(description="most concurrent requests scored in one model call")
    largest_batch: int = Field(description="largest batch seen since start-up")
    model_calls: int
    images_scored: int


class HealthResponse(BaseModel):
    status: str
    model: ModelDescription
    batching: BatchingStats | None = None


UPLOAD_ERRORS = {
    400: {"model": ErrorResponse, "description": "empty upload"},
    413: {"model": ErrorResponse, "description": "file over the size limit"},
    415: {"model": ErrorResponse, "description": "not an image"},
    422: {"model": ErrorResponse, "description": "corrupt or truncated image (corrupt_image), or no file part (missing_file)"},
}


# ----------------------------------------------------------------------------
# Size limit: refuse big bodies before they are parsed or spooled anywhere


class BodySizeLimit:
    """ASGI middleware: a POST to an upload path larger than ``max_body`` gets 413.

    Content-Length is checked up front; a chunked body is counted as it
    arrives and cut off once over the limit.
    """

    def __init__(self, app: ASGIApp, max_body: int, max_file: int,
                 reject: Callable[[Scope, UploadRejected], Response]):
        self.app, self.max_body, self.max_file, self.reject = app, max_body, max_file, reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in UPLOAD_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await self._drain(receive, limit=DRAIN_LIMIT_FACTOR * self.max_body)
            await self.reject(scope, too_large(int(declared), self.max_file))(scope, receive, send)
            return
        seen = 0
        over = False
        started = False

        async def counting_receive() -> Message:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:  # the app's own answer to the cut-off body is replaced below
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self.reject(scope, too_large(None, self.max_file))(scope, receive, send)

    @staticmethod
    async def _drain(receive: Receive, limit: int) -> None:
        # Read (and drop) what the client is sending so a browser sees the answer rather
        # than a reset connection; past ``limit`` the server closes the connection instead.
        seen = 0
        while seen <= limit:
            message = await receive()
            seen += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                return


# ----------------------------------------------------------------------------
# The app


@dataclass
class ServiceSettings:
    max_upload_mb: float
    keep_uploads: bool
    upload_dir: Path | None
    max_pixels: int | None
    max_batch: int

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * MIB)


@dataclass
class Scored:
    checked: CheckedImage
    prediction: Prediction
    heatmap: HeatMap | None


def settings_from(config: Mapping[str, Any] | None, **overrides: Any) -> ServiceSettings:
    serving = dict(SERVING_DEFAULTS)
    serving.update((config or {}).get("serving") or {})
    serving.update({k: v for k, v in overrides.items() if v is not None})
    max_pixels = ((config or {}).get("data") or {}).get("max_pixels")
    upload_dir = serving.get("upload_dir")
    if serving["keep_uploads"] and not upload_dir:
        raise ValueError("serving.keep_uploads is on but serving.upload_dir is not set")
    if float(serving["max_upload_mb"]) <= 0:
        raise ValueError("serving.max_upload_mb must be > 0")
    return ServiceSettings(
        max_upload_mb=float(serving["max_upload_mb"]),
        keep_uploads=bool(serving["keep_uploads"]),
        upload_dir=Path(upload_dir) if upload_dir else None,
        max_pixels=int(max_pixels) if max_pixels else None,
        max_batch=int(serving.get("max_batch") or 1),
    )


def create_app(
    model_dir: str | Path | None = None,
    *,
    backend: ModelBackend | None = None,
    config: Mapping[str, Any] | None = None,
    max_upload_mb: float | None = None,
    keep_uploads: bool | None = None,
    upload_dir: str | Path | None = None,
) -> FastAPI:
    """The service for the model in ``model_dir`` (or an already loaded ``backend``).

    ``config`` is a loaded project config (its ``serving`` and ``data.max_pixels``
    are used); keyword arguments override it.
    """
    settings = settings_from(config, max_upload_mb=max_upload_mb, keep_uploads=keep_uploads, upload_dir=upload_dir)
    if backend is None:
        if model_dir is None:
            raise ValueError("create_app needs model_dir or backend")
        backend = load_backend(model_dir, max_batch=settings.max_batch)
    info = backend.info
    input_size = backend.input_size
    # The model's own decompression-bomb guard, as the batch job applies it.
    max_pixels = backend.max_pixels or settings.max_pixels

    app = FastAPI(
        title="Chest X-ray pneumonia classifier",
        version="1.0",
        description=(
            f"Serves model `{info.model_id}` ({info.name}). POST a chest X-ray (JPEG/PNG, at most "
            f"{settings.max_upload_mb:g} MB) to /predict. Upload page at /."
        ),
        docs_url=None,   # Swagger UI / ReDoc pull their assets from a CDN; the machine is offline
        redoc_url=None,
    )
    app.state.backend = backend
    app.state.settings = settings
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
            return render_page(Request(scope), status_code=rejection.status_code, error=rejection)
        return JSONResponse(rejection.as_json(), status_code=rejection.status_code)

    app.add_middleware(
        BodySizeLimit,
        max_body=settings.max_bytes + MULTIPART_OVERHEAD,
        max_file=settings.max_bytes,
        reject=reject_response,
    )

    def score(data: bytes, with_heatmap: bool) -> Scored:
        checked = check_upload(data, settings.max_bytes, size=input_size, max_pixels=max_pixels)
        try:
            prediction = backend.predict(data)
        except PredictionError as err:
            raise UploadRejected(422, "corrupt_image", f"The model could not read this image: {err}.") from err
        heatmap = None
        if with_heatmap and backend.supports_heatmap:
            try:
                heatmap = backend.heatmap(data)
            except Exception:  # noqa: BLE001 - the prediction stands without its explanation
                log.exception("Grad-CAM failed for %s; answering without a heat map", info.model_id)
        if settings.keep_uploads:
            keep_upload(settings.upload_dir, data, checked, prediction, info.model_id)
        return Scored(checked, prediction, heatmap)

    async def read_upload(file: UploadFile | None) -> bytes:
        if file is None:
            return b""
        # One byte past the limit is enough to know it is over.
        return await file.read(settings.max_bytes + 1)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        if any(tuple(err.get("loc", ()))[-1:] == ("file",) for err in errors):
            rejection = UploadRejected(422, "missing_file", "No image in the request: send it as the multipart field 'file'.")
        else:
            problems = "; ".join(f"{'.'.join(map(str, err.get('loc', ())))}: {err.get('msg')}" for err in errors)
            rejection = UploadRejected(422, "invalid_request", f"Invalid request ({problems}).")
        return reject_response(request.scope, rejection)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(request: Request) -> HTMLResponse:
        return render_page(request)

    @app.post("/", response_class=HTMLResponse, include_in_schema=False)
    async def page_predict(request: Request, file: UploadFile | None = File(None)) -> HTMLResponse:
        data = await read_upload(file)
        filename = (file.filename if file else "") or ""
        try:
            scored = await run_in_threadpool(score, data, True)
        except UploadRejected as rejection:
            return render_page(request, status_code=rejection.status_code, error=rejection, filename=filename)
        shown, mime = browser_image(data, scored.checked)
        return render_page(
            request,
            result=scored.prediction,
            checked=scored.checked,
            filename=filename,
            image_uri=data_uri(shown, mime),
            heatmap_uri=data_uri(scored.heatmap.png, "image/png") if scored.heatmap else None,
            heatmap_flat=bool(scored.heatmap and scored.heatmap.flat),
        )

    @app.post(
        "/predict",
        response_model=PredictionResponse,
        response_model_by_alias=True,
        responses=UPLOAD_ERRORS,
        summary="Classify one chest X-ray",
    )
    async def predict(
        file: UploadFile = File(..., description="the image (JPEG or PNG)"),
        heatmap: bool = Query(False, description="add a Grad-CAM overlay PNG (CNN models only)"),
    ) -> Any:
        data = await read_upload(file)
        try:
            scored = await run_in_threadpool(score, data, heatmap)
        except UploadRejected as rejection:
            return JSONResponse(rejection.as_json(), status_code=rejection.status_code)
        return prediction_json(scored, info)

    @app.get("/health", response_model=HealthResponse, summary="Liveness and the loaded model")
    async def health() -> dict[str, Any]:
        stats = getattr(backend, "batching_stats", None)
        return {"status": "ok", "model": info.as_dict(), "batching": stats() if stats else None}

    return app




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
    }


def keep_upload(upload_dir: Path, data: bytes, checked: CheckedImage, prediction: Prediction, model_id: str) -> Path:
    """Write an accepted upload under a generated name (never the client's) with its prediction beside it."""
    upload_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}"
    path = upload_dir / f"{stem}.{'jpeg' if checked.format == 'jpeg' else checked.format or 'img'}"
    path.write_bytes(data)
    record = {"model_id": model_id, "label_name": prediction.label_name, "probability": prediction.probability,
              "threshold": prediction.threshold, "width": checked.width, "height": checked.height}
    (upload_dir / f"{stem}.json").write_text(json.dumps(record, indent=1))
    return path
