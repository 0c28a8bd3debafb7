"""Batch prediction with a saved run: new images in, one row per image out.

``predict_images`` loads ``RUN/model`` (the fitted PipelineModel) and the
threshold from ``RUN/classifier.json``, scores a folder (any depth, any layout)
or a packed Parquet table of images, and returns a DataFrame with
``path, probability, predicted_label, predicted_class, threshold, error``.
Files that are not images or do not decode get a row with ``error`` set and no
probability: they are listed, never fatal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pyspark.ml import PipelineModel
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ...images.layout import SNIFF_BYTES, junk_reason

OUTPUT_COLUMNS = ("path", "probability", "predicted_label", "predicted_class", "threshold", "error")


@dataclass
class SavedRun:
    model: PipelineModel
    spec: dict[str, Any]

    @property
    def threshold(self) -> float:
        return float(self.spec["threshold"])

    @property
    def label_names(self) -> list[str]:
        return list(self.spec["label_names"])


def load_run(run_uri: str) -> SavedRun:
    """The run's PipelineModel and classifier.json; refuses an incomplete run or other backbone weights."""
    from ...infra import run_folder, storage
    from ...models.backbones import check_weights_file, resolve_weights_file

    root = run_uri.rstrip("/")
    run_folder.require_complete(root)
    spec_uri = root + "/classifier.json"
    if not storage.exists(spec_uri):
        raise FileNotFoundError(f"{spec_uri} not found: --model must be a run folder of jobs/train_featurizer.py")
    model = PipelineModel.load(root + "/model")
    spec = json.loads(storage.read_bytes(spec_uri))
    featurizer = model.stages[0]
    # Scored on the runtime it was trained on; a run from before the setting: Keras at fp32, all there was.
    featurizer.setRuntime(spec.get("runtime") or "keras").setPrecision(spec.get("precision") or "fp32")
    weights = featurizer.getOrDefault("weights")
    if weights is None or "://" not in weights or weights.startswith("file://"):
        # Local files are checked here, on the driver, before any task; remote ones on each executor.
        local = resolve_weights_file(featurizer.getOrDefault("modelName"), weights)
        sha = featurizer.getOrDefault("weightsSha256") if featurizer.hasParam("weightsSha256") else None
        check_weights_file(local, sha, featurizer.getOrDefault("modelName"))
    return SavedRun(model=model, spec=spec)


def read_new_images(spark: SparkSession, uri: str) -> DataFrame:
    """DataFrame[path, content, junk]: every file under ``uri`` (recursive), or a Parquet table
    with ``path`` and ``content`` columns. ``junk`` is why a file is skipped (name/size/magic), else null."""
    if uri.rstrip("/").endswith(".parquet"):
        df = spark.read.parquet(uri).select("path", "content")
    else:
        df = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(uri).select("path", "content")

    @F.udf(T.StringType())
    def junk(path, content):
        return junk_reason(
            path,
            len(content) if content is not None else None,
            bytes(content[:SNIFF_BYTES]) if content is not None else None,
        )

    return df.withColumn("junk", junk("path", "content"))


def _featurizer_and_classifier(model: PipelineModel):
    stages = model.stages
    return stages[0], PipelineModel(stages=stages[1:])


def score(run: SavedRun, images: DataFrame, threshold: float | None = None) -> DataFrame:
    """Scores DataFrame[path, content, junk] -> OUTPUT_COLUMNS (one row per input file)."""
    threshold = run.threshold if threshold is None else float(threshold)
    featurizer, classifier = _featurizer_and_classifier(run.model)
    error_col = featurizer.getOrDefault("errorCol")
    features_col = featurizer.getOrDefault("outputCol")
    usable = images.where(F.col("junk").isNull()).drop("junk")
    featurized = featurizer.transform(usable).drop("content").cache()
    good = featurized.where(F.col(features_col).isNotNull())
    scored = classifier.transform(good).select(
        "path", vector_to_array(F.col("probability")).getItem(1).alias("probability")
    )
    names = F.array(*[F.lit(n) for n in run.label_names])
    predicted = (F.col("probability") >= F.lit(threshold)).cast("int")
    ok = scored.select(
        "path",
        "probability",
        predicted.alias("predicted_label"),
        F.element_at(names, predicted + 1).alias("predicted_class"),
        F.lit(threshold).alias("threshold"),
        F.lit(None).cast("string").alias("error"),
    )
    failed = featurized.where(F.col(features_col).isNull()).select("path", F.col(error_col).alias("error"))
    junk = images.where(F.col("junk").isNotNull()).select("path", F.col("junk").alias("error"))
    rejected = failed.unionByName(junk).select(
        "path",
        F.lit(None).cast("double").alias("probability"),
        F.lit(None).cast("int").alias("predicted_label"),
        F.lit(None).cast("string").alias("predicted_class"),
        F.lit(threshold).alias("threshold"),
        "error",
    )
    return ok.unionByName(rejected).select(*OUTPUT_COLUMNS)


@dataclass
class PredictionSummary:
    out: str
    scored: int
    unreadable: int
    by_class: dict[str, int]
    files: dict[str, str] = field(default_factory=dict)  # what was written: "parquet", "csv", "unreadable" -> URI


def predict_images(
    spark: SparkSession,
    run_uri: str,
    images_uri: str,
    out_uri: str,
    csv: bool = False,
    threshold: float | None = None,
    overwrite: bool = False,
) -> PredictionSummary:
    """Writes ``OUT/predictions.parquet`` (and ``OUT/predictions_csv/`` with ``csv``) and
    ``OUT/unreadable.csv`` (path, error) when some files could not be scored; all or nothing,
    ``_SUCCESS`` last (:mod:`cxr_pipeline.infra.run_folder`). A bar counts the images scored (on a terminal)."""
    from ...infra import run_folder

    run = load_run(run_uri)
    final = out_uri.rstrip("/")
    with run_folder.staged_output(final, overwrite=overwrite, tool="predict") as stage:
        summary = _write_predictions(spark, run, images_uri, stage, csv, threshold)
    files = {kind: final + uri[len(stage) :] for kind, uri in summary.files.items()}
    return PredictionSummary(
        out=final, scored=summary.scored, unreadable=summary.unreadable, by_class=summary.by_class, files=files
    )


def _write_predictions(
    spark: SparkSession, run: SavedRun, images_uri: str, out: str, csv: bool, threshold: float | None
) -> PredictionSummary:
    from ...infra import storage
    from ...infra.progress import images_bar

    images = read_new_images(spark, images_uri)
    total = images.count()  # a listing: the count reads no image bytes
    stats = run.model.stages[0].track_stats(spark)  # its image count drives the bar
    result = score(run, images, threshold)
    files = {"parquet": out + "/predictions.parquet"}
    with images_bar(lambda: stats.images.value, total, "scoring"):
        result.write.mode("overwrite").parquet(files["parquet"])
    written = spark.read.parquet(files["parquet"])
    if csv:
        files["csv"] = out + "/predictions_csv"
        written.coalesce(1).write.mode("overwrite").option("header", "true").csv(files["csv"])
    unreadable = written.where(F.col("error").isNotNull()).select("path", "error").orderBy("path").collect()
    if unreadable:
        files["unreadable"] = out + "/unreadable.csv"
        lines = ["path,error"] + [f'"{r["path"]}","{r["error"]}"' for r in unreadable]
        storage.write_bytes(files["unreadable"], ("\n".join(lines) + "\n").encode())
    counts = {
        r["predicted_class"]: r["count"]
        for r in written.where(F.col("error").isNull()).groupBy("predicted_class").count().collect()
    }
    return PredictionSummary(
        out=out, scored=sum(counts.values()), unreadable=len(unreadable), by_class=counts, files=files
    )
