"""The API's schema: what ``/openapi.json`` describes for ``/predict`` and ``/health``, and the error answers."""

from __future__ import annotations

from pydantic import BaseModel, Field


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
