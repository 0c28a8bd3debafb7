"""Prediction service: an upload page and a JSON API over one saved model.

``python -m cxr_pipeline.serving --model RUN`` (or ``make serve MODEL=RUN``)
serves a run folder of the Spark job or the CNN job under uvicorn;
:func:`create_app` builds the FastAPI app for tests and embedding.
"""

from .app import create_app
from .backends import ModelBackend, ModelInfo, ModelLoadError, Prediction, load_backend

__all__ = ["create_app", "load_backend", "ModelBackend", "ModelInfo", "ModelLoadError", "Prediction"]
