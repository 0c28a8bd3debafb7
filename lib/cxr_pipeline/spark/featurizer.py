"""``ImageFeaturizer``: a Spark ML Transformer from image bytes to backbone features.

What sparkdl's ``DeepImageFeaturizer`` did, done with a scalar-iterator pandas
UDF: each task decodes and resizes ``batchSize`` images at a time with Pillow
(:mod:`cxr_pipeline.images.decode`) and runs them through a ``keras.applications``
backbone built once per Python worker (:mod:`cxr_pipeline.spark._udf`).

    featurizer = ImageFeaturizer(inputCol="content", outputCol="features",
                                 modelName="InceptionV3", featureLayer="mixed5")
    features = featurizer.transform(read_images(spark, "hdfs://nn:9000/data/chest_xray"))

Param defaults are the ``featurizer:`` section of ``conf/defaults.yaml`` (and
``data.max_pixels``), read through :class:`FeaturizerSettings`: the one place a
config section becomes featurizer settings.

Adds ``outputCol`` (an ML ``DenseVector``; null when the image could not be
decoded) and ``errorCol`` (the reason, e.g. "truncated image", else null).
``inputCol`` may also be the ``image`` struct column of Spark's image source.
Persisted through its Params only (``DefaultParamsWritable/Readable``), so it
saves and loads on its own and inside a ``Pipeline``/``PipelineModel``.

``runtime``/``precision`` (``featurizer.runtime``/``featurizer.precision``): what runs the backbone,
Keras itself or ONNX Runtime / OpenVINO on an ONNX file converted from the same weights file
(:mod:`cxr_pipeline.models.runtimes`); both are part of the feature cache's fingerprint.

``weights``: null = the provisioned file (``make weights``), a local path, an
``hdfs://`` (any Hadoop) URI shipped to executors once with
``SparkContext.addFile``, ``"imagenet"`` (Keras' download) or ``"random"``.
"""

from __future__ import annotations

import functools
import json
import logging
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
from pyspark import keyword_only
from pyspark.ml import Transformer
from pyspark.ml.functions import array_to_vector
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasInputCol, HasOutputCol
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from .. import config as cfg
from ..images.decode import INTENSITY_MODES
from ..models import backbones
from ._udf import FeaturizerStats, WorkerSettings, featurize_batches

log = logging.getLogger(__name__)

RESULT_TYPE = T.StructType(
    [
        T.StructField("features", T.ArrayType(T.FloatType())),
        T.StructField("error", T.StringType()),
    ]
)
ARROW_MAX_BYTES_PER_BATCH = 64 * 1024 * 1024


@dataclass(frozen=True)
class FeaturizerSettings:
    """The ``featurizer:`` section of ``conf/defaults.yaml`` (its one home) plus ``data.max_pixels``.

    Built by ``config.section_settings``: the fields are the section's allowed keys, an unknown key is
    refused, a missing one is named (``conf/defaults.yaml`` defines them all), then ``validate()``.
    ``ImageFeaturizer``'s Param defaults and ``training.build_featurizer`` both come from here.
    """

    model_name: str
    feature_layer: str | None
    weights: str | None
    backbone_run: str | None  # a train_cnn run whose fine-tuned backbone sets the four fields around it
    batch_size: int
    arrow_batch_size: int
    image_size: int | None
    runtime: str
    precision: str
    max_pixels: int  # data.max_pixels: the same guard the reader and every decoder use
    intensity: str  # data.intensity: imaging.normalize_intensity, the same for every path

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FeaturizerSettings:
        return cfg.section_settings(
            cls,
            config,
            "featurizer",
            max_pixels=cfg.require(config, "data.max_pixels"),
            intensity=cfg.require(config, "data.intensity"),
        )

    @classmethod
    def defaults(cls) -> FeaturizerSettings:
        """From ``conf/defaults.yaml`` alone (read once per process)."""
        return _default_settings()

    def validate(self) -> None:
        backbones.spec(self.model_name)  # BackboneError naming the known backbones
        for name in ("batch_size", "arrow_batch_size", "max_pixels"):
            if int(getattr(self, name)) < 1:
                raise cfg.ConfigError(f"featurizer.{name} must be >= 1, got {getattr(self, name)!r}")
        cfg.require_choice(self.intensity, INTENSITY_MODES, "data.intensity")
        cfg.require_choice(self.runtime, backbones.RUNTIMES, "featurizer.runtime")
        cfg.require_choice(self.precision, backbones.PRECISIONS, "featurizer.precision")
        try:
            backbones.check_runtime(self.runtime, self.precision)
        except backbones.BackboneError as exc:
            raise cfg.ConfigError(str(exc)) from None
        if self.image_size is not None and int(self.image_size) < 32:
            raise cfg.ConfigError(f"featurizer.image_size must be null or >= 32, got {self.image_size!r}")

    def params(self) -> dict[str, Any]:
        """``ImageFeaturizer`` keyword arguments (the Param names)."""
        values = asdict(self)
        return {_PARAM_OF[name]: value for name, value in values.items() if name in _PARAM_OF}


_PARAM_OF = {
    "model_name": "modelName",
    "feature_layer": "featureLayer",
    "weights": "weights",
    "batch_size": "batchSize",
    "arrow_batch_size": "arrowBatchSize",
    "image_size": "imageSize",
    "runtime": "runtime",
    "precision": "precision",
    "max_pixels": "maxPixels",
    "intensity": "intensity",
}


class BackboneRunError(cfg.ConfigError):
    """``featurizer.backbone_run`` names no usable train_cnn run."""


def resolve_backbone_run(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with the featurizer set from the fine-tuned backbone of the train_cnn run that
    ``featurizer.backbone_run`` names (its ``cnn.json`` ``backbone`` entry): model, weights file (read from
    the run folder, wherever it is), pooled layer and image size. Unchanged when ``backbone_run`` is null.

    The CNN was trained on ``data.intensity``-normalized images, so another setting here is refused: the
    features would come from pixels the backbone never saw.
    """
    from ..infra import run_folder, storage

    run = cfg.require(config, "featurizer.backbone_run")
    if not run:
        return dict(config)
    run = str(run).rstrip("/")
    try:
        run_folder.require_complete(run)
        backbone = json.loads(storage.read_bytes(storage.join(run, "cnn.json"))).get("backbone")
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise BackboneRunError(f"featurizer.backbone_run {run}: not a finished train_cnn run ({exc})") from exc
    if not backbone:
        raise BackboneRunError(
            f"featurizer.backbone_run {run}: this CNN run exported no backbone (only --model inception_v3 does)"
        )
    if backbone["intensity"] != cfg.get(config, "data.intensity"):
        raise BackboneRunError(
            f"featurizer.backbone_run {run} was trained with data.intensity={backbone['intensity']}, this job has "
            f"{cfg.get(config, 'data.intensity')}: pass --set data.intensity={backbone['intensity']}"
        )
    weights = storage.join(run, backbone["weights_file"])
    resolved = cfg.deep_merge(
        config,
        {
            "featurizer": {
                "model_name": backbone["model_name"],
                "weights": weights,
                "feature_layer": backbone["feature_layer"],
                "image_size": int(backbone["image_size"]),
            }
        },
    )
    actual = backbones.weights_sha256(backbone["model_name"], weights)
    if actual != backbone["weights_sha256"]:
        raise backbones.WeightsMismatchError(
            f"{weights} has sha256 {actual[:16]}..., but {run}/cnn.json recorded {backbone['weights_sha256'][:16]}...: "
            "the backbone file was replaced after the CNN run wrote it; re-run train_cnn"
        )
    return resolved


@functools.lru_cache(maxsize=1)
def _default_settings() -> FeaturizerSettings:
    from ..paths import CONF_DIR

    return FeaturizerSettings.from_config(cfg.read_yaml(CONF_DIR / "defaults.yaml"))


def configure_arrow_for_images(spark: SparkSession, records: int | None = None) -> None:
    """Cap Arrow batches for image UDFs (Spark's default of 10,000 rows would be GBs of JPEGs).

    ``records``: ``featurizer.arrow_batch_size`` when not given. The cap is the session's
    ``spark.sql.execution.arrow.maxRecordsPerBatch`` (Spark reads it when the plan runs, so it
    cannot be set per UDF), and it only ever lowers the limits: a smaller setting is kept.
    """
    records = records or FeaturizerSettings.defaults().arrow_batch_size
    current = int(spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch", "10000"))
    if current <= 0 or current > records:
        spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(records))
    current_bytes = int(spark.conf.get("spark.sql.execution.arrow.maxBytesPerBatch", str(2**31 - 1)))
    if current_bytes > ARROW_MAX_BYTES_PER_BATCH:
        spark.conf.set("spark.sql.execution.arrow.maxBytesPerBatch", str(ARROW_MAX_BYTES_PER_BATCH))


def _or_null(convert):
    """A Param type converter that also takes None (``Params.set``, used when loading, converts null too)."""

    def converter(value):
        return None if value is None else convert(value)

    return converter


def make_featurize_udf(settings: WorkerSettings, stats: FeaturizerStats | None = None):
    """The scalar-iterator pandas UDF: image bytes (or image structs) -> struct(features, error)."""

    @F.pandas_udf(RESULT_TYPE)
    def featurize(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        yield from featurize_batches(settings, batches, stats)

    # Deterministic UDFs get inlined: a filter on the error column would be pushed
    # below the projection and run the whole model twice per image.
    return featurize.asNondeterministic()


class ImageFeaturizer(Transformer, HasInputCol, HasOutputCol, DefaultParamsReadable, DefaultParamsWritable):
    """Image bytes -> pooled features of a ``keras.applications`` backbone (see the module doc).

    Params left unset take the ``featurizer:`` defaults of ``conf/defaults.yaml``
    (:class:`FeaturizerSettings`); ``inputCol``/``outputCol``/``errorCol`` default to
    ``content``/``features``/``featurize_error``.

    Examples
    --------
    >>> from cxr_pipeline.spark.featurizer import ImageFeaturizer
    >>> featurizer = ImageFeaturizer(featureLayer="mixed0", imageSize=96, batchSize=4)
    >>> featurizer.getModelName(), featurizer.getFeatureLayer(), featurizer.image_size()
    ('InceptionV3', 'mixed0', (96, 96))
    >>> featurizer.setParams(outputCol="vec").getOutputCol()
    'vec'
    >>> images = spark.read.format("binaryFile").load("tests/data/chest_xray")  # doctest: +SKIP
    >>> rows = featurizer.transform(images).select("path", "vec", "featurize_error").collect()  # doctest: +SKIP
    >>> len(rows[0].vec)  # doctest: +SKIP
    256
    >>> featurizer.save("/tmp/featurizer")  # doctest: +SKIP
    >>> ImageFeaturizer.load("/tmp/featurizer").getFeatureLayer()  # doctest: +SKIP
    'mixed0'
    """

    errorCol = Param(
        Params._dummy(),
        "errorCol",
        "output column: why an image was not featurized (null if it was)",
        typeConverter=TypeConverters.toString,
    )
    modelName = Param(
        Params._dummy(),
        "modelName",
        f"backbone: {', '.join(backbones.BACKBONES)}",
        typeConverter=TypeConverters.toString,
    )
    featureLayer = Param(
        Params._dummy(),
        "featureLayer",
        "layer whose output is pooled (null = the last)",
        typeConverter=_or_null(TypeConverters.toString),
    )
    weights = Param(
        Params._dummy(),
        "weights",
        "null (provisioned default), a local path, a Hadoop URI, 'imagenet' or 'random'",
        typeConverter=_or_null(TypeConverters.toString),
    )
    weightsSha256 = Param(
        Params._dummy(),
        "weightsSha256",
        "sha256 the weights file must have on every executor (null = unchecked)",
        typeConverter=_or_null(TypeConverters.toString),
    )
    batchSize = Param(
        Params._dummy(),
        "batchSize",
        "images decoded and run through the model at a time",
        typeConverter=TypeConverters.toInt,
    )
    maxPixels = Param(
        Params._dummy(),
        "maxPixels",
        "decompression-bomb guard: reject images above width*height",
        typeConverter=TypeConverters.toInt,
    )
    imageSize = Param(
        Params._dummy(),
        "imageSize",
        "square input side images are resized to (null = the backbone's native size, e.g. 299)",
        typeConverter=_or_null(TypeConverters.toInt),
    )
    intensity = Param(
        Params._dummy(),
        "intensity",
        f"intensity normalization before the resize: {', '.join(INTENSITY_MODES)} (imaging.normalize_intensity)",
        typeConverter=TypeConverters.toString,
    )
    runtime = Param(
        Params._dummy(),
        "runtime",
        f"what runs the backbone: {', '.join(backbones.RUNTIMES)} (the same weights; see models/runtimes.py)",
        typeConverter=TypeConverters.toString,
    )
    precision = Param(
        Params._dummy(),
        "precision",
        f"the backbone's arithmetic: {', '.join(backbones.PRECISIONS)} (bf16: openvino on AMX/avx512_bf16 CPUs)",
        typeConverter=TypeConverters.toString,
    )
    arrowBatchSize = Param(
        Params._dummy(),
        "arrowBatchSize",
        "cap for spark.sql.execution.arrow.maxRecordsPerBatch while featurizing",
        typeConverter=TypeConverters.toInt,
    )

    @keyword_only
    def __init__(
        self,
        *,
        inputCol: str | None = None,
        outputCol: str | None = None,
        errorCol: str | None = None,
        modelName: str | None = None,
        featureLayer: str | None = None,
        weights: str | None = None,
        weightsSha256: str | None = None,
        batchSize: int | None = None,
        maxPixels: int | None = None,
        imageSize: int | None = None,
        intensity: str | None = None,
        arrowBatchSize: int | None = None,
        runtime: str | None = None,
        precision: str | None = None,
    ):
        """__init__(self, \\*, inputCol=None, outputCol=None, errorCol=None, modelName=None, featureLayer=None, \
        weights=None, weightsSha256=None, batchSize=None, maxPixels=None, imageSize=None, intensity=None, \
        arrowBatchSize=None, runtime=None, precision=None)

        Only the arguments given are set; the others keep their defaults (see the class doc).
        """
        super().__init__()
        self._setDefault(
            inputCol="content",
            outputCol="features",
            errorCol="featurize_error",
            weightsSha256=None,
            **FeaturizerSettings.defaults().params(),
        )
        self.setParams(**self._input_kwargs)

    @keyword_only
    def setParams(
        self,
        *,
        inputCol: str | None = None,
        outputCol: str | None = None,
        errorCol: str | None = None,
        modelName: str | None = None,
        featureLayer: str | None = None,
        weights: str | None = None,
        weightsSha256: str | None = None,
        batchSize: int | None = None,
        maxPixels: int | None = None,
        imageSize: int | None = None,
        intensity: str | None = None,
        arrowBatchSize: int | None = None,
        runtime: str | None = None,
        precision: str | None = None,
    ) -> ImageFeaturizer:
        """setParams(self, \\*, inputCol=None, outputCol=None, errorCol=None, modelName=None, featureLayer=None, \
        weights=None, weightsSha256=None, batchSize=None, maxPixels=None, imageSize=None, intensity=None, \
        arrowBatchSize=None, runtime=None, precision=None)

        Sets the Params given (an explicit ``None`` sets null, e.g. ``featureLayer=None`` = the last layer).
        """
        return self._set(**self._input_kwargs)

    # Getters / setters, pyspark.ml style.
    def setInputCol(self, value: str) -> ImageFeaturizer:
        return self._set(inputCol=value)

    def setOutputCol(self, value: str) -> ImageFeaturizer:
        return self._set(outputCol=value)

    def getErrorCol(self) -> str:
        return self.getOrDefault(self.errorCol)

    def setErrorCol(self, value: str) -> ImageFeaturizer:
        return self._set(errorCol=value)

    def getModelName(self) -> str:
        return self.getOrDefault(self.modelName)

    def setModelName(self, value: str) -> ImageFeaturizer:
        return self._set(modelName=value)

    def getFeatureLayer(self) -> str | None:
        return self.getOrDefault(self.featureLayer)

    def setFeatureLayer(self, value: str | None) -> ImageFeaturizer:
        return self._set(featureLayer=value)

    def getWeights(self) -> str | None:
        return self.getOrDefault(self.weights)

    def setWeights(self, value: str | None) -> ImageFeaturizer:
        return self._set(weights=value)

    def getWeightsSha256(self) -> str | None:
        return self.getOrDefault(self.weightsSha256)

    def setWeightsSha256(self, value: str | None) -> ImageFeaturizer:
        return self._set(weightsSha256=value)

    def getBatchSize(self) -> int:
        return self.getOrDefault(self.batchSize)

    def setBatchSize(self, value: int) -> ImageFeaturizer:
        return self._set(batchSize=value)

    def getMaxPixels(self) -> int:
        return self.getOrDefault(self.maxPixels)

    def setMaxPixels(self, value: int) -> ImageFeaturizer:
        return self._set(maxPixels=value)

    def getImageSize(self) -> int | None:
        return self.getOrDefault(self.imageSize)

    def setImageSize(self, value: int | None) -> ImageFeaturizer:
        return self._set(imageSize=value)

    def getIntensity(self) -> str:
        return self.getOrDefault(self.intensity)

    def setIntensity(self, value: str) -> ImageFeaturizer:
        return self._set(intensity=value)

    def getArrowBatchSize(self) -> int:
        return self.getOrDefault(self.arrowBatchSize)

    def getRuntime(self) -> str:
        return self.getOrDefault(self.runtime)

    def setRuntime(self, value: str) -> ImageFeaturizer:
        return self._set(runtime=value)

    def getPrecision(self) -> str:
        return self.getOrDefault(self.precision)

    def setPrecision(self, value: str) -> ImageFeaturizer:
        return self._set(precision=value)

    def track_stats(self, spark: SparkSession) -> FeaturizerStats:
        """Accumulators filled by the workers of later transforms: decode/predict seconds,
        images, peak worker RSS. Not a Param: not saved with the featurizer."""
        self._stats = FeaturizerStats(spark.sparkContext)
        return self._stats

    # ------------------------------------------------------------------ logic
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` images are resized to (``imageSize`` or the backbone's input)."""
        return backbones.resolve_image_size(self.getModelName(), self.getImageSize())

    def worker_settings(self, spark: SparkSession | None = None) -> WorkerSettings:
        """What the workers need; ships a remote weights file with ``addFile`` when ``spark`` is given."""
        backbones.spec(self.getModelName())  # fail fast on an unknown backbone
        backbones.check_runtime(self.getRuntime(), self.getPrecision())
        weights = self.getWeights()
        spark_file = None
        if spark is not None and weights and "://" in weights and not weights.startswith("file://"):
            spark_file = _ship_file(spark, weights)
        elif spark is not None and _is_local_master(spark):
            # Executors share this machine: a missing or replaced file fails here, before any task starts.
            local = backbones.resolve_weights_file(self.getModelName(), weights)
            backbones.check_weights_file(local, self.getWeightsSha256(), self.getModelName())
        return WorkerSettings(
            model_name=self.getModelName(),
            feature_layer=self.getFeatureLayer() or None,
            weights=weights,
            weights_spark_file=spark_file,
            weights_sha256=self.getWeightsSha256(),
            batch_size=self.getBatchSize(),
            max_pixels=self.getMaxPixels(),
            intensity=self.getIntensity(),
            image_size=self.image_size() if self.getImageSize() else None,
            runtime=self.getRuntime(),
            precision=self.getPrecision(),
            prefetch=getattr(self, "prefetch", False),  # bench_featurizer --prefetch; not a Param
        )

    def _transform(self, dataset: DataFrame) -> DataFrame:
        input_col, output_col, error_col = self.getInputCol(), self.getOutputCol(), self.getErrorCol()
        if input_col not in dataset.columns:
            raise ValueError(f"input column {input_col!r} not in {dataset.columns}")
        for taken in (output_col, error_col):
            if taken in dataset.columns:
                raise ValueError(f"output column {taken!r} already exists")
        spark = dataset.sparkSession
        configure_arrow_for_images(spark, self.getArrowBatchSize())
        featurize = make_featurize_udf(self.worker_settings(spark), getattr(self, "_stats", None))
        result = "__featurized"
        features = F.col(f"{result}.features")
        return (
            dataset.withColumn(result, featurize(F.col(input_col)))
            # array_to_vector fails on null: failed images keep a null vector
            .withColumn(output_col, F.when(features.isNotNull(), array_to_vector(features)))
            .withColumn(error_col, F.col(f"{result}.error"))
            .drop(result)
        )


def _is_local_master(spark: SparkSession) -> bool:
    return spark.sparkContext.master.startswith("local")


def _ship_file(spark: SparkSession, uri: str) -> str | None:
    """``SparkContext.addFile(uri)`` once; the name executors pass to ``SparkFiles.get``.

    None when another file of the same name is already registered: workers then
    download the URI themselves (once per host).
    """
    context = spark.sparkContext
    name = posixpath.basename(uri.rstrip("/"))
    try:
        registered = list(context.listFiles)
    except Exception:  # noqa: BLE001 - older PySpark without listFiles
        registered = []
    if any(path.rstrip("/") == uri.rstrip("/") for path in registered):
        return name
    if any(posixpath.basename(path.rstrip("/")) == name for path in registered):
        log.warning("a different file named %s is already shipped; workers will download %s", name, uri)
        return None
    try:
        context.addFile(uri)
    except Exception as exc:  # noqa: BLE001 - e.g. a name clash Spark detected itself
        log.warning("addFile(%s) failed (%s); workers will download it", uri, exc)
        return None
    return name


def split_failures(
    featurized: DataFrame, error_col: str = "featurize_error", path_col: str = "path"
) -> tuple[DataFrame, DataFrame]:
    """``(images that got features, [path, reason] of those that did not)``."""
    good = featurized.where(F.col(error_col).isNull())
    failed = featurized.where(F.col(error_col).isNotNull()).select(path_col, F.col(error_col).alias("reason"))
    return good, failed
