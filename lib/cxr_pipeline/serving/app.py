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

Modules: ``settings`` (the serving section), ``schemas`` (the API's), ``guards`` (the middleware),
``uploads`` (decoding once, keeping), ``backends`` (the models), ``validation`` (what an upload may be).
"""

from __future__ import annotations

import asyncio
import base64
import logging
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
from starlette.concurrency import run_in_threadpool
from starlette.types import Scope

from .. import config as cfg
from ..models.tensorflow_runtime import import_tensorflow
from .backends import HeatMap, ModelBackend, Prediction, load_backend
from .guards import MULTIPART_OVERHEAD, Admission, BearerToken, BodyReceiver, HostCheck, LoadCounters, busy
from .schemas import UPLOAD_ERRORS, HealthResponse, PredictionResponse
from .settings import ServingSettings
from .uploads import UploadKeeper, decode_upload
from .validation import MIB, CheckedImage, UploadRejected, browser_image

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent


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
