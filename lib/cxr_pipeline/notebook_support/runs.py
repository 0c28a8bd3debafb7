"""Run folders as notebook tables: the pipeline's stages, metrics.json's headline numbers, counts, figures,
and the test scores of a Spark run (from its feature-cache snapshot) or a CNN run (its predictions.csv);
Spark-free scoring of files with a run's exported classifier."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .shim import _caller_globals, display_or_save

if TYPE_CHECKING:
    import pandas as pd


def image_key(path: str) -> str:
    """``split/CLASS/file`` of an image path or URI: the same image whatever scheme wrote its path."""
    from ..images.layout import parse_image_path

    parsed = parse_image_path(path)
    return f"{parsed.split}/{parsed.label_name}/{parsed.file_name}"


def describe_pipeline(pipeline) -> pd.DataFrame:
    """One row per stage of a (fitted or not) Spark ML Pipeline: class, input/output columns, parameters set."""
    import pandas as pd

    if isinstance(pipeline, (list, tuple)):
        stages = list(pipeline)
    else:
        stages = pipeline.getStages() if hasattr(pipeline, "getStages") else pipeline.stages
    rows = []
    for index, stage in enumerate(stages):
        params = {p.name: stage.getOrDefault(p) for p in stage.params if stage.isSet(p) or stage.hasDefault(p)}
        columns = {k: params.pop(k) for k in list(params) if k.endswith("Col") or k.endswith("Cols")}
        rows.append(
            {
                "stage": index,
                "class": type(stage).__name__,
                "columns": ", ".join(f"{k}={v}" for k, v in sorted(columns.items())),
                "params": ", ".join(f"{k}={v}" for k, v in sorted(params.items()) if stage.isSet(stage.getParam(k))),
            }
        )
    return pd.DataFrame(rows)


_REPORT_COLUMNS = (
    "threshold",
    "n",
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "npv",
    "f1",
    "tn",
    "fp",
    "fn",
    "tp",
)


def metrics_table(report: Mapping[str, Any]) -> pd.DataFrame:
    """The headline numbers of a Spark run's metrics.json: test (and validation) at the chosen threshold and 0.5."""
    import pandas as pd

    rows = []
    blocks = (
        ("test", report.get("test") or {}, "areaUnderROC"),
        ("validation", report.get("validation") or {}, "roc_auc"),
    )
    for subset, block, auc_key in blocks:
        for key, name in (("at_chosen", "chosen on validation"), ("at_default_0.5", "0.5")):
            values = block.get(key)
            if not values or "accuracy" not in values:
                continue
            row = {"subset": subset, "threshold_rule": name, "auc": block.get(auc_key)}
            row.update({k: values.get(k) for k in _REPORT_COLUMNS})
            rows.append(row)
    return pd.DataFrame(rows)


def counts_table(report: Mapping[str, Any]) -> pd.DataFrame:
    """Images per subset (train / val / test) and class from a run's metrics (``counts`` or ``class_counts``)."""
    import pandas as pd

    counts = report.get("counts")
    if counts is None:  # CNN runs: class_counts = {subset: [n per label]}
        names = report.get("label_names") or ["NORMAL", "PNEUMONIA"]
        counts = {subset: dict(zip(names, values)) for subset, values in (report.get("class_counts") or {}).items()}
    order = [s for s in ("train", "val", "test") if s in counts] + sorted(set(counts) - {"train", "val", "test"})
    table = pd.DataFrame([{"subset": s, **counts[s]} for s in order])
    if len(table):
        table["total"] = table.drop(columns="subset").sum(axis=1)
    return table


def show_run_figures(
    run_uri: str, file_names, prefix: str = "", namespace: Mapping[str, Any] | None = None
) -> list[Path]:
    """Show the PNGs a training run wrote (``roc.png``, ...), copied to the notebook output; missing ones are named."""
    from ..infra import storage

    scope = _caller_globals(namespace)
    shown = []
    for name in file_names:
        uri = run_uri.rstrip("/") + "/" + name
        if not storage.exists(uri):
            print(f"[plot] {uri} not written by this run (e.g. a one-class test set has no ROC)")
            continue
        shown.append(display_or_save(storage.read_bytes(uri), prefix + name.rsplit(".", 1)[0], namespace=scope))
    return shown


def spark_test_scores(spark, run_uri: str, data_uri: str | None = None) -> pd.DataFrame:
    """P(PNEUMONIA) of a Spark run's PipelineModel on the test images: ``[key, path, label, score]``.

    Uses the run's features cache when it is still there (no re-featurizing),
    else reads the test images from ``data_uri`` (default: the run's data).
    """
    from pyspark.ml import PipelineModel
    from pyspark.sql import functions as F

    from ..infra import storage
    from ..spark.classifier import training

    run = training.RunLayout(run_uri.rstrip("/"))
    report = training.load_metrics(run.root)
    model = PipelineModel.load(run.model)
    featurizer, classifier = model.stages[0], PipelineModel(stages=model.stages[1:])
    features_col = featurizer.getOrDefault("outputCol")
    cache = (report.get("featurizer") or {}).get("cache")
    snapshot = cache.get("snapshot") if isinstance(cache, dict) else None
    if snapshot and storage.exists(snapshot.rstrip("/") + "/_SUCCESS") and storage.exists(run.images):
        import io

        import pandas as pd

        used = pd.read_csv(io.BytesIO(storage.read_bytes(run.images)))
        test = spark.createDataFrame(used[used["subset"] == "test"][["path", "label"]])
        features = spark.read.parquet(snapshot).join(test, "path")
    else:
        from ..spark.reader import read_images_with_rejections

        images = read_images_with_rejections(spark, data_uri or report["data"]).images.where(F.col("split") == "test")
        features = featurizer.transform(images)
    scored = training.with_scores(classifier.transform(features.where(F.col(features_col).isNotNull())))
    table = scored.select("path", "label", F.col(training.SCORE_COL).alias("score")).toPandas()
    table.insert(0, "key", table["path"].map(image_key))
    return table.sort_values("key").reset_index(drop=True)


def cnn_test_scores(run_uri: str) -> pd.DataFrame:
    """The CNN run's own test predictions (``predictions.csv``): ``[key, path, label, score]``."""
    from ..infra.tables import read_table

    table = read_table(run_uri.rstrip("/") + "/predictions.csv")
    table = table[table["used_as"] == "test"].rename(columns={"probability": "score"})
    table.insert(0, "key", table["path"].map(image_key))
    return table[["key", "path", "label", "score"]].sort_values("key").reset_index(drop=True)


def run_threshold(run_uri: str) -> float:
    """The validation-chosen threshold a run saved (classifier.json for Spark runs, cnn.json for CNN runs)."""
    import json

    from ..infra import storage

    root = run_uri.rstrip("/")
    for name in ("classifier.json", "cnn.json"):
        if storage.exists(f"{root}/{name}"):
            return float(json.loads(storage.read_bytes(f"{root}/{name}"))["threshold"])
    raise FileNotFoundError(f"{root} has neither classifier.json nor cnn.json: not a training run folder")


def score_files_local(classifier, uri: str, limit: int | None = None, threshold: float | None = None) -> pd.DataFrame:
    """Score the files under ``uri`` with a Spark-free classifier (``LocalClassifier``/``LocalCnnClassifier``).

    Returns ``[path, probability, label_name, threshold, error, content]``, sorted by path.
    Files that are not images come back with ``error`` set.
    """
    import pandas as pd

    from ..infra import storage

    infos = sorted(storage.list_files(uri), key=lambda f: f.uri)[: limit or None]
    contents = [storage.read_bytes(info.uri) for info in infos]
    results = classifier.predict_bytes(contents, threshold=threshold) if contents else []
    table = pd.DataFrame(
        [
            {"path": info.uri, **{k: r.get(k) for k in ("probability", "label_name", "threshold", "error")}}
            for info, r in zip(infos, results)
        ],
        columns=["path", "probability", "label_name", "threshold", "error"],
    )
    table["content"] = contents
    return table


def _path_only(uri: str) -> str:
    # hdfs://nn:9000/a, file:/a, file:///a and /a all name /a.
    text = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*", "", str(uri))
    return re.sub(r"^file:", "", text)


def probability_gap(first: pd.DataFrame, second: pd.DataFrame) -> tuple[int, float]:
    """(images scored in both, largest |probability difference|) of two ``[path, probability]`` tables."""
    a = first[["path", "probability"]].dropna().assign(path=lambda d: d["path"].map(_path_only))
    b = second[["path", "probability"]].dropna().assign(path=lambda d: d["path"].map(_path_only))
    both = a.merge(b, on="path", suffixes=("_a", "_b"))
    if both.empty:
        return 0, float("nan")
    return len(both), float((both["probability_a"] - both["probability_b"]).abs().max())
