"""A Spark training run into MLflow: the job's result as the plain payload ``tracking.log_run`` takes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ... import tracking
from .training import RunLayout, TrainingResult


def log_spark_run(
    config: Mapping[str, Any], result: TrainingResult, data_uri: str, spark, started_at: float | None = None
) -> tracking.LoggedRun | None:
    """Logs a finished training (its PipelineModel through ``mlflow.spark``, which needs the live session).
    ``started_at``: ``time.time()`` when the job began (the MLflow run's start). Never raises."""
    record = tracking.RunRecord(
        kind="spark",
        run_uri=result.run.root,
        metrics=result.metrics,
        data_uri=data_uri,
        model=tracking.SparkModel(result.model),
        started_at=started_at,
        tags={"spark_master": spark.sparkContext.master},
    )
    return tracking.log_run(config, record)


def log_saved_spark_run(
    config: Mapping[str, Any], run_uri: str, metrics: Mapping[str, Any], data_uri: str, spark
) -> tracking.LoggedRun | None:
    """A run folder written earlier, logged now (``python -m cxr_pipeline.tracking log --kind spark``)."""
    from pyspark.ml import PipelineModel

    run = RunLayout(run_uri)
    result = TrainingResult(run=run, model=PipelineModel.load(run.model), metrics=dict(metrics), summary="")
    return log_spark_run(config, result, data_uri, spark)
