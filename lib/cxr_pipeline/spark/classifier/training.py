"""Training the Spark ML classifier: featurizer -> StandardScaler -> LogisticRegression.

The flow of ``train`` (called by ``jobs/train_featurizer.py``):

1. read the image tree (junk is rejected and listed, never fatal);
2. featurize once into a Parquet cache keyed by data URI, backbone, layer and
   image size, so re-training or tuning reuses the features;
3. assign subsets: ``train``/``val`` carved from the training images grouped by
   patient (or the dataset's own ``val`` folder), ``test`` = the test folder,
   used only for the final report;
4. fit StandardScaler + LogisticRegression (inverse-frequency weight column by
   default; optional CrossValidator / TrainValidationSplit over a small grid);
5. choose the decision threshold on validation for the target sensitivity;
6. evaluate on test and write the run folder (see ``RunLayout``).

The saved ``PipelineModel`` has all three stages, so it scores raw images.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.evaluation import BinaryClassificationEvaluator
from pyspark.ml.feature import StandardScaler
from pyspark.ml.functions import vector_to_array
from pyspark.ml.tuning import CrossValidator, ParamGridBuilder, TrainValidationSplit
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from ... import config as cfg
from ...evaluation import metrics as M
from ...evaluation.training_settings import TrainingSettings
from ...images import splits
from ...images.dicom import PUBLISHED_KEY_WARNING, DicomSettings
from ...images.layout import invert_label_index, label_index, parse_image_path, patient_id
from ..featurizer import FeaturizerSettings
from .model_export import CLASSIFIER_FILE

log = logging.getLogger(__name__)

FEATURES_COL = "features"
SCALED_COL = "scaled_features"
WEIGHT_COL = "weight"
SCORE_COL = "p_pneumonia"
POSITIVE_LABEL = "PNEUMONIA"


class TrainingError(RuntimeError):
    """The data cannot train a classifier (no images, one class in training, ...)."""


@dataclass(frozen=True)
class RunLayout:
    """The files of a run folder (local path or hdfs:// URI)."""

    root: str

    def file(self, name: str) -> str:
        return self.root.rstrip("/") + "/" + name

    model = property(lambda self: self.file("model"))  # PipelineModel.save
    config = property(lambda self: self.file("config.yaml"))
    metrics = property(lambda self: self.file("metrics.json"))
    classifier = property(lambda self: self.file(CLASSIFIER_FILE))
    roc = property(lambda self: self.file("roc.png"))
    pr = property(lambda self: self.file("pr.png"))
    confusion = property(lambda self: self.file("confusion_matrix.png"))
    threshold_plot = property(lambda self: self.file("threshold.png"))
    rejected = property(lambda self: self.file("rejected.csv"))
    images = property(lambda self: self.file("images.csv"))  # path, subset, label, label_name of every image used
    summary = property(lambda self: self.file("summary.txt"))


# ---------------------------------------------------------------- timing


@dataclass
class PhaseTimer:
    """Wall time per phase of a run (metrics.json ``timing``; bench/bench_training_phases.py prints the shares).

    Spark is lazy, so a phase is the wall time between two points where work is forced: listing is
    the file listing (the classes, the image count), featurizing includes writing the feature cache,
    cache_read is reading the cached features back into memory, writing is the
    model save; the files written after metrics.json are not counted.
    """

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - began

    def report(self, featurized_images: int = 0) -> dict[str, Any]:
        total = sum(self.seconds.values())
        timing: dict[str, Any] = {
            "seconds": {name: round(value, 3) for name, value in self.seconds.items()},
            "total_seconds": round(total, 3),
            "shares": {name: round(value / total, 4) if total else 0.0 for name, value in self.seconds.items()},
        }
        featurizing = self.seconds.get("featurizing", 0.0)
        if featurized_images and featurizing:
            timing["featurize_images_per_s"] = round(featurized_images / featurizing, 3)
        return timing

    def text(self) -> str:
        total = sum(self.seconds.values())
        parts = [f"{name} {value:.1f}s ({value / total:.0%})" for name, value in self.seconds.items()] if total else []
        return f"Time: {total:.1f}s = " + ", ".join(parts)


# ---------------------------------------------------------------- featurization


def build_featurizer(settings: FeaturizerSettings):
    """The ``ImageFeaturizer`` stage for these settings (weights and their sha256 resolved on the driver)."""
    from ...models.backbones import weights_sha256
    from ..featurizer import ImageFeaturizer

    return ImageFeaturizer(**settings.params(), weightsSha256=weights_sha256(settings.model_name, settings.weights))


def features_cache_root(out_uri: str, cache_root: str | None = None) -> str:
    """``training.features_cache``, or ``_features_cache`` next to the run folder."""
    return (cache_root or (out_uri.rstrip("/").rsplit("/", 1)[0] + "/_features_cache")).rstrip("/")


def data_source(config: Mapping[str, Any]) -> str:
    """``data.source``, refused before any Spark work when it is not one the reader knows."""
    from ..reader import SOURCES

    return cfg.require_choice(cfg.require(config, "data.source"), SOURCES, "data.source")


def open_feature_cache(config: Mapping[str, Any], data_uri: str, out_uri: str, featurizer, settings: TrainingSettings):
    from ..feature_cache import FeatureCache, fingerprint

    print_ = fingerprint(featurizer, data_source(config), cfg.require(config, "dicom"))
    return FeatureCache(
        features_cache_root(out_uri, settings.features_cache),
        data_uri,
        print_,
        lease_hours=settings.features_cache_lease_hours,
    )


# ---------------------------------------------------------------- subsets


def assign_subsets(
    features: DataFrame, settings: TrainingSettings, patients: Mapping[str, str] | None = None
) -> tuple[DataFrame, dict[str, Any]]:
    """Adds ``subset`` (train | val | test) and ``patient``.

    ``carve``: training images and the dataset's small ``val`` folder are pooled
    and split by patient; ``folder``: the folders are used as they are.
    ``patients``: path -> patient from the image headers (the keyed hash of a DICOM
    PatientID, ``ReadResult.patients``); other images' patient comes from the file name.
    """
    spark = features.sparkSession
    rows = features.select("path", "split", "label").collect()
    subset: dict[str, str] = {}
    pool = [r for r in rows if r["split"] in splits.CARVE_POOL]

    def grouping_name(path: str) -> str:  # what splits.* group by: a file name, or the header's patient
        name = parse_image_path(path).file_name
        header = (patients or {}).get(path)
        return header if header and header != patient_id(name) else name

    if settings.validation == "carve":
        names = [grouping_name(r["path"]) for r in pool]
        flags = splits.is_validation(names, [r["label"] for r in pool], settings.validation_fraction, settings.seed)
        summary = splits.summarize(names, flags)
        for r, is_val in zip(pool, flags):
            subset[r["path"]] = "val" if is_val else "train"
        info = {
            "mode": "carve",
            "fraction": settings.validation_fraction,
            "seed": settings.seed,
            "train_patients": summary.train_patients,
            "val_patients": summary.val_patients,
        }
    else:
        for r in pool:
            subset[r["path"]] = r["split"]
        info = {"mode": "folder"}
    for r in rows:
        if r["split"] == "test":
            subset[r["path"]] = "test"
    mapping = spark.createDataFrame(
        [(p, s, patient_id(grouping_name(p))) for p, s in subset.items()],
        "path string, subset string, patient string",
    )
    return features.join(F.broadcast(mapping), "path", "inner"), info


def counts_by_subset(df: DataFrame, label_names: list[str]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for row in df.groupBy("subset", "label").count().collect():
        counts.setdefault(row["subset"], {name: 0 for name in label_names})[label_names[row["label"]]] = row["count"]
    return counts


# ---------------------------------------------------------------- classifier


def add_class_weights(df: DataFrame, class_counts: list[int]) -> tuple[DataFrame, list[float]]:
    """A ``weight`` column = n / (k * n_class) from the training counts (balanced => 1.0)."""
    weights = M.inverse_frequency_weights(class_counts)
    expr = F.lit(1.0)
    for label, weight in enumerate(weights):
        expr = F.when(F.col("label") == label, F.lit(float(weight))).otherwise(expr)
    return df.withColumn(WEIGHT_COL, expr.cast("double")), weights


def build_classifier(settings: TrainingSettings, weighted: bool) -> tuple[Pipeline, LogisticRegression]:
    scaler = StandardScaler(inputCol=FEATURES_COL, outputCol=SCALED_COL, withMean=True, withStd=True)
    lr = LogisticRegression(
        featuresCol=SCALED_COL,
        labelCol="label",
        regParam=float(settings.reg_param),
        elasticNetParam=float(settings.elastic_net_param),
        maxIter=int(settings.max_iter),
        family="binomial",
    )
    if weighted:
        lr.setWeightCol(WEIGHT_COL)
    return Pipeline(stages=[scaler, lr]), lr


def _param_grid(lr: LogisticRegression, grid: Mapping[str, list[float]]):
    names = {"reg_param": lr.regParam, "elastic_net_param": lr.elasticNetParam, "max_iter": lr.maxIter}
    builder = ParamGridBuilder()
    for key, values in (grid or {}).items():
        if key not in names:
            raise cfg.ConfigError(f"training.grid.{key}: can tune only {', '.join(names)}")
        builder = builder.addGrid(names[key], [int(v) if key == "max_iter" else float(v) for v in values])
    return builder.build()


def _patient_folds(df: DataFrame, folds: int, seed: int) -> DataFrame:
    # Folds by patient (a salted hash), so CrossValidator never splits a patient either.
    return df.withColumn("fold", F.pmod(F.xxhash64(F.lit(str(seed)), F.col("patient")), F.lit(folds)).cast("int"))


def fit_classifier(
    train_df: DataFrame, settings: TrainingSettings, weighted: bool
) -> tuple[PipelineModel, dict[str, Any]]:
    """Fits scaler + LR (tuned or not). Returns (PipelineModel[scaler, lr], tuning info)."""
    pipeline, lr = build_classifier(settings, weighted)
    if settings.tuning == "none":
        return pipeline.fit(train_df), {"mode": "none"}
    grid = _param_grid(lr, settings.grid)
    evaluator = BinaryClassificationEvaluator(labelCol="label", metricName="areaUnderROC")
    if settings.tuning == "cv":
        tuner = CrossValidator(
            estimator=pipeline,
            estimatorParamMaps=grid,
            evaluator=evaluator,
            numFolds=int(settings.tuning_folds),
            seed=int(settings.seed),
            foldCol="fold",
        )
        fitted = tuner.fit(_patient_folds(train_df, int(settings.tuning_folds), int(settings.seed)))
        scores = list(fitted.avgMetrics)
    else:
        tuner = TrainValidationSplit(
            estimator=pipeline, estimatorParamMaps=grid, evaluator=evaluator, trainRatio=0.8, seed=int(settings.seed)
        )
        fitted = tuner.fit(train_df)
        scores = list(fitted.validationMetrics)
    candidates = [{**{p.name: m[p] for p in m}, "areaUnderROC": s} for m, s in zip(grid, scores)]
    best = fitted.bestModel
    best_lr = best.stages[-1]
    info = {
        "mode": settings.tuning,
        "metric": "areaUnderROC",
        "candidates": candidates,
        "best": {
            "regParam": best_lr.getOrDefault("regParam"),
            "elasticNetParam": best_lr.getOrDefault("elasticNetParam"),
            "maxIter": best_lr.getOrDefault("maxIter"),
        },
    }
    return best, info


def with_scores(predictions: DataFrame) -> DataFrame:
    """Adds ``p_pneumonia`` = probability of label 1 (PNEUMONIA)."""
    return predictions.withColumn(SCORE_COL, vector_to_array(F.col("probability")).getItem(1))


def collect_scores(predictions: DataFrame) -> tuple[list[int], list[float]]:
    rows = predictions.select("label", SCORE_COL).collect()
    return [int(r["label"]) for r in rows], [float(r[SCORE_COL]) for r in rows]


def choose_threshold(
    val_labels: list[int], val_scores: list[float], target: float | None = None, **rule: Any
) -> M.ThresholdChoice:
    """The validation threshold by ``training.threshold_rule`` (``rule``: ``TrainingSettings.threshold_rule_args``;
    none = the highest threshold reaching sensitivity ``target``)."""
    rule = {"rule": "sensitivity", **rule}
    if target is not None:
        rule["target_sensitivity"] = target
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", M.ThresholdWarning)
        choice = M.choose_threshold_by_rule(val_labels, val_scores, **rule)
    for w in caught:
        log.warning("threshold: %s", w.message)
    return choice


# ---------------------------------------------------------------- the whole run


@dataclass
class TrainingResult:
    run: RunLayout
    model: PipelineModel
    metrics: dict[str, Any]
    summary: str


def label_names_of(df: DataFrame) -> list[str]:
    pairs = {(r["label"], r["label_name"]) for r in df.select("label", "label_name").distinct().collect()}
    names = invert_label_index(label_index(name for _, name in pairs))
    for label, name in pairs:
        if names[label] != name:
            raise TrainingError(f"label {label} is {name!r} but the layout says {names[label]!r}")
    return names


def featurizer_for(config: Mapping[str, Any]) -> tuple[dict[str, Any], FeaturizerSettings]:
    """``config`` with ``featurizer.backbone_run`` resolved, and the featurizer settings built from it: a job
    builds them once (before Spark starts: a bad backbone run or missing weights fail early) and hands both on."""
    from ..featurizer import resolve_backbone_run

    resolved = resolve_backbone_run(config)
    return resolved, FeaturizerSettings.from_config(resolved)


def train(
    spark: SparkSession,
    config: Mapping[str, Any],
    data_uri: str,
    out_uri: str,
    overwrite: bool = False,
    featurizer: FeaturizerSettings | None = None,
) -> TrainingResult:
    """Trains and evaluates into ``out_uri``, all or nothing (see :mod:`cxr_pipeline.infra.run_folder`).

    A non-empty ``out_uri`` is refused unless ``overwrite``; the run is written into a temporary
    sibling and renamed into place with ``_SUCCESS`` last, so a failure leaves ``out_uri`` as it was.
    ``featurizer``: the settings :func:`featurizer_for` built, with the ``config`` it returned; None = built here.
    """
    from ...infra import run_folder

    final = out_uri.rstrip("/")
    if featurizer is None:
        config, featurizer = featurizer_for(config)
    settings = TrainingSettings.from_config(config)
    data_source(config)
    job = _Job(spark, config, data_uri, None, final, settings, featurizer, build_featurizer(featurizer))
    with run_folder.staged_output(final, overwrite=overwrite, tool="train_featurizer") as stage:
        job.run = RunLayout(stage)
        result = _train_into(job)
    return TrainingResult(run=RunLayout(final), model=result.model, metrics=result.metrics, summary=result.summary)


@dataclass
class _Job:
    """What one training run works with, from the listing to the report: ``run`` is the staged folder being
    written, ``final`` the folder it becomes."""

    spark: SparkSession
    config: Mapping[str, Any]
    data_uri: str
    run: RunLayout | None  # set once the staged folder exists
    final: str
    settings: TrainingSettings
    featurizer_settings: FeaturizerSettings
    featurizer: Any  # the ImageFeaturizer built from featurizer_settings
    timer: PhaseTimer = field(default_factory=PhaseTimer)
    warnings: list[str] = field(default_factory=list)  # also in metrics.json and at the end of summary.txt


def _train_into(job: _Job) -> TrainingResult:
    from ...infra import storage
    from ..reader import read_images_with_rejections

    spark, config, data_uri, final, timer = job.spark, job.config, job.data_uri, job.final, job.timer
    storage.write_bytes(
        job.run.config,
        cfg.dump_config(
            {**config, "data": {**config.get("data", {}), "uri": data_uri}, "run": {"out": final}}
        ).encode(),
    )
    dicom = DicomSettings.from_config(config)
    with timer.phase("listing"):
        read = read_images_with_rejections(spark, data_uri, source=data_source(config), dicom=dicom)
    # pseudonyms were made here from DICOM headers (a packed table's were made when it was packed)
    if read.patients is not None and data_source(config) != "parquet" and dicom.uses_published_key():
        log.warning(PUBLISHED_KEY_WARNING)
        job.warnings.append(PUBLISHED_KEY_WARNING)
    cache = open_feature_cache(config, data_uri, final, job.featurizer, job.settings)
    with timer.phase("featurizing"):
        cached, outcome, snapshot = cache.features_for(spark, read, job.featurizer)
    log.info("feature cache %s: %s", cache.uri, outcome.reason)
    features = read.labelled_paths().join(cached, "path", "inner")
    with cache.lease(snapshot):
        result = _fit_and_report(job, read, features, outcome)
    cache.prune(keep=snapshot)
    return result


def _read_features(features: DataFrame, read, settings: TrainingSettings, data_uri: str):
    """The cached features read back into memory with their subsets: (data, label names, split, rejected, counts).

    ``features`` (the listing joined with the cache's Parquet) is held in memory while the steps below
    look at it four times (failures, label names, the patient split's collect, the subsets' counts):
    otherwise each of them would list the tree and read the cache again.

    It is held in as many partitions as the cluster has cores (``defaultParallelism``), not in the listing's
    (33 for 1,000 X-rays, sized for reading image bytes): the fit and the evaluation run dozens of Spark jobs
    on these rows, each job paying the scheduling of every partition (an LBFGS iteration took 0.3 s over 33
    partitions of 1,000 rows, ``bench/bench_training_phases.py --stages``).
    """
    cores = max(1, features.sparkSession.sparkContext.defaultParallelism)
    features = features.coalesce(cores).persist()
    try:
        failed = features.where(F.col(FEATURES_COL).isNull()).select("path", F.col("featurize_error").alias("reason"))
        rejected = read.rejected.select("path", "reason").unionByName(failed).collect()
        good = features.where(F.col(FEATURES_COL).isNotNull())
        if good.limit(1).count() == 0:
            raise TrainingError(f"no usable images under {data_uri} ({len(rejected)} rejected)")
        label_names = label_names_of(good)
        if len(label_names) != 2 or label_names[1] != POSITIVE_LABEL:
            raise TrainingError(f"expected classes NORMAL and PNEUMONIA, found {label_names}")

        patients = (
            {r["path"]: r["patient"] for r in read.patients.select("path", "patient").collect()}
            if read.patients is not None
            else None
        )
        data, split_info = assign_subsets(good, settings, patients)
        data = data.cache()
        counts = counts_by_subset(data, label_names)  # counting fills data's cache from the persisted features
    finally:
        features.unpersist()
    return data, label_names, split_info, rejected, counts


def _fit_and_report(job: _Job, read, features: DataFrame, outcome) -> TrainingResult:
    from ...infra import storage
    from . import evaluation, model_export

    run, settings, timer, fsettings = job.run, job.settings, job.timer, job.featurizer_settings
    with timer.phase("cache_read"):
        data, label_names, split_info, rejected, counts = _read_features(features, read, settings, job.data_uri)
    train_counts = [counts.get("train", {}).get(n, 0) for n in label_names]
    if min(train_counts) == 0:
        raise TrainingError(f"training subset has a single class: {dict(zip(label_names, train_counts))}")

    train_df = data.where(F.col("subset") == "train")
    class_weights = None
    if settings.class_weighting:
        train_df, class_weights = add_class_weights(train_df, train_counts)
    with timer.phase("fitting"):
        classifier, tuning_info = fit_classifier(train_df, settings, weighted=settings.class_weighting)

    with timer.phase("evaluation"):
        scored = with_scores(classifier.transform(data.where(F.col("subset").isin("val", "test")))).cache()
        val_labels, val_scores = collect_scores(scored.where(F.col("subset") == "val"))
        choice = choose_threshold(val_labels, val_scores, **settings.threshold_rule_args())
    model = PipelineModel(stages=[job.featurizer, *classifier.stages])
    with timer.phase("writing"):
        model.write().save(run.model)

    test = scored.where(F.col("subset") == "test")
    with timer.phase("evaluation"):
        report = evaluation.evaluate(test, choice, label_names)
        report["validation"] = evaluation.validation_report(val_labels, val_scores, choice)
    report.update(
        {
            "data": job.data_uri,
            "run": job.final,
            "counts": counts,
            "split": split_info,
            "rejected": len(rejected),
            "class_weights": dict(zip(label_names, class_weights)) if class_weights else None,
            "classifier": {
                "regParam": classifier.stages[-1].getOrDefault("regParam"),
                "elasticNetParam": classifier.stages[-1].getOrDefault("elasticNetParam"),
                "maxIter": classifier.stages[-1].getOrDefault("maxIter"),
                "iterations": classifier.stages[-1].summary.totalIterations
                if classifier.stages[-1].hasSummary
                else None,
            },
            "tuning": tuning_info,
            "featurizer": {
                "model_name": fsettings.model_name,
                "feature_layer": fsettings.feature_layer,
                "image_size": fsettings.image_size,
                "intensity": fsettings.intensity,
                "runtime": fsettings.runtime,
                "precision": fsettings.precision,
                "weights_sha256": job.featurizer.getWeightsSha256(),
                "backbone_run": fsettings.backbone_run,
                "cache": outcome.as_dict(),
            },
            "timing": timer.report(outcome.featurized_rows or 0),
            "warnings": job.warnings,
        }
    )
    evaluation.write_report(run, report, test, label_names)
    storage.write_bytes(run.rejected, _rejections_csv(rejected).encode())
    storage.write_bytes(
        run.images, _images_csv(data.select("path", "subset", "label", "label_name").orderBy("path").collect()).encode()
    )
    if fsettings.backbone_run:  # the fine-tuned weights travel with the run: serving needs no CNN run folder
        storage.write_bytes(run.file(posixpath.basename(fsettings.weights)), storage.read_bytes(fsettings.weights))
    model_export.export_classifier(
        model, run.root, threshold=choice.threshold, label_names=label_names, image_size=fsettings.image_size
    )
    summary = evaluation.summary_text(report).rstrip("\n") + "\n" + timer.text() + "\n"
    summary += "".join(f"WARNING: {warning}\n" for warning in job.warnings)
    storage.write_bytes(run.summary, summary.encode())
    data.unpersist()
    scored.unpersist()
    return TrainingResult(run=run, model=model, metrics=report, summary=summary)


def _csv(header: list[str], rows) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for r in rows:
        writer.writerow([r[name] for name in header])
    return buf.getvalue()


def _rejections_csv(rows) -> str:
    return _csv(["path", "reason"], rows)


def _images_csv(rows) -> str:
    """Which image went to which subset with which label: the exact data behind the run's figures."""
    return _csv(["path", "subset", "label", "label_name"], rows)


def load_metrics(run_uri: str) -> dict[str, Any]:
    from ...infra import storage

    return json.loads(storage.read_bytes(RunLayout(run_uri).metrics))
