"""A CNN training run into MLflow: the run folder as the plain payload ``tracking.log_run`` takes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import tracking
from .predict import LocalCnnClassifier


def log_cnn_run(
    config: Mapping[str, Any], metrics: Mapping[str, Any], run_uri: str, data_uri: str, started_at: float | None = None
) -> tracking.LoggedRun | None:
    """Logs a finished ``train.train_and_evaluate`` run folder; its model through MLflow's Keras flavor, loaded
    from the run folder's local copy. ``started_at``: ``time.time()`` when the job began. Never raises."""
    record = tracking.RunRecord(
        kind="cnn",
        run_uri=run_uri,
        metrics=metrics,
        data_uri=data_uri,
        model=tracking.KerasModel(load=LocalCnnClassifier.load),
        started_at=started_at,
        tags={"spark_master": "none (the CNN trains with Keras, not Spark)"},
    )
    return tracking.log_run(config, record)
