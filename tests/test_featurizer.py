"""The ImageFeaturizer Transformer on a real local Spark (and the standalone cluster + HDFS).

Every test featurizes with the same backbone settings where it can, so the
Python workers of the session build the model once and reuse it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_reader import make_tree
from tolerances import assert_same_features, same_probability

from cxr_pipeline.config import ConfigError, load_config
from cxr_pipeline.images.decode import INTENSITY_MODES, decode_image
from cxr_pipeline.models.backbones import BackboneError, build_backbone, featurize_arrays
from cxr_pipeline.spark.featurizer import FeaturizerSettings, ImageFeaturizer, split_failures
from cxr_pipeline.spark.reader import read_images, read_images_with_rejections

LAYER = "mixed0"  # cheap to compute, and ImageNet-trained in the provisioned weights
INTENSITY = FeaturizerSettings.defaults().intensity  # what an ImageFeaturizer decodes with unless told otherwise
OTHER_INTENSITY = next(mode for mode in INTENSITY_MODES if mode != INTENSITY)
REPO = Path(__file__).resolve().parents[1]


def keras_features(
    paths: list[str], feature_layer: str = LAYER, weights=None, side: int = 299, intensity: str = INTENSITY
) -> np.ndarray:
    """A plain Keras predict on the same files: the reference the featurizer must match."""
    model = build_backbone("InceptionV3", weights=weights, feature_layer=feature_layer, image_size=side)
    batch = np.stack([decode_image(Path(p).read_bytes(), (side, side), intensity=intensity) for p in paths])
    return featurize_arrays(model, "InceptionV3", batch, batch_size=len(batch))


def local_path(uri: str) -> str:
    return uri[len("file:") :] if uri.startswith("file:") else uri


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("featurizer_tree")
    make_tree(root)
    return root


@pytest.fixture(scope="module")
def featurized(spark, tree):
    images = read_images(spark, str(tree))
    featurizer = ImageFeaturizer(featureLayer=LAYER, batchSize=4)
    return featurizer.transform(images).select("path", "label", "features", "featurize_error").collect()


def test_features_equal_plain_keras_predict(featurized):
    good = sorted((r for r in featurized if r.featurize_error is None), key=lambda r: r.path)
    assert len(good) == 8
    got = np.stack([r.features.toArray() for r in good])
    expected = keras_features([local_path(r.path) for r in good])
    assert got.shape == (8, 256)
    assert_same_features(got, expected)
    assert np.abs(got).sum() > 0 and not np.allclose(got[0], got[1])


def test_smaller_image_size_matches_keras_at_that_size(spark, tree):
    featurizer = ImageFeaturizer(featureLayer=LAYER, imageSize=96, batchSize=4)
    assert featurizer.image_size() == (96, 96)
    rows = featurizer.transform(read_images(spark, str(tree))).where("featurize_error IS NULL").collect()
    rows.sort(key=lambda r: r.path)
    expected = keras_features([local_path(r.path) for r in rows], side=96)
    assert_same_features(np.stack([r.features.toArray() for r in rows]), expected)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_other_runtimes_give_the_keras_features_in_the_workers(spark, tree, runtime):
    featurizer = ImageFeaturizer(featureLayer=LAYER, imageSize=96, batchSize=4, runtime=runtime)
    rows = featurizer.transform(read_images(spark, str(tree))).collect()
    errors = {r.path.rsplit("/", 1)[-1]: r.featurize_error for r in rows if r.featurize_error}
    assert errors == {"text.jpeg": "not an image", "truncated.jpeg": "truncated image"}
    good = sorted((r for r in rows if r.featurize_error is None), key=lambda r: r.path)
    expected = keras_features([local_path(r.path) for r in good], side=96)
    assert_same_features(np.stack([r.features.toArray() for r in good]), expected)


def test_the_other_intensity_mode_matches_keras_on_those_pixels(spark, tree):
    featurizer = ImageFeaturizer(featureLayer=LAYER, imageSize=96, batchSize=4, intensity=OTHER_INTENSITY)
    rows = featurizer.transform(read_images(spark, str(tree))).where("featurize_error IS NULL").collect()
    rows.sort(key=lambda r: r.path)
    got = np.stack([r.features.toArray() for r in rows])
    paths = [local_path(r.path) for r in rows]
    assert_same_features(got, keras_features(paths, side=96, intensity=OTHER_INTENSITY))
    assert not np.allclose(got, keras_features(paths, side=96), rtol=1e-2)  # the Param is not ignored


def test_broken_files_are_reported_not_fatal(featurized, spark):
    errors = {r.path.rsplit("/", 1)[-1]: r.featurize_error for r in featurized if r.featurize_error}
    assert errors == {"text.jpeg": "not an image", "truncated.jpeg": "truncated image"}
    assert all(r.features is None for r in featurized if r.featurize_error)
    frame = spark.createDataFrame([("a", None), ("b", "truncated image")], "path string, featurize_error string")
    good, failed = split_failures(frame)
    assert [r.path for r in good.collect()] == ["a"]
    assert [tuple(r) for r in failed.collect()] == [("b", "truncated image")]


def test_pipeline_with_featurizer_saves_and_loads(spark, tree, tmp_path):
    from pyspark.ml import Pipeline, PipelineModel
    from pyspark.ml.classification import LogisticRegression

    images = read_images(spark, str(tree)).where("path NOT LIKE '%text.jpeg' AND path NOT LIKE '%truncated.jpeg'")
    pipeline = Pipeline(
        stages=[
            ImageFeaturizer(featureLayer=LAYER, batchSize=4),
            LogisticRegression(featuresCol="features", labelCol="label", maxIter=5),
        ]
    )
    model = pipeline.fit(images)
    model.write().overwrite().save(str(tmp_path / "pipeline"))
    loaded = PipelineModel.load(str(tmp_path / "pipeline"))
    featurizer = loaded.stages[0]
    assert isinstance(featurizer, ImageFeaturizer)
    assert (featurizer.getFeatureLayer(), featurizer.getBatchSize(), featurizer.getWeights()) == (LAYER, 4, None)
    before = {r.path: r.probability[1] for r in model.transform(images).collect()}
    after = {r.path: r.probability[1] for r in loaded.transform(images).collect()}
    assert before.keys() == after.keys() and len(before) == 8
    for path, p in before.items():
        assert after[path] == same_probability(p)


SAVED_BEFORE_ISSUE_29 = REPO / "tests" / "fixtures" / "pipeline_saved_before_issue29"


def test_a_pipeline_saved_before_the_package_moves_still_loads_and_scores(spark, tree):
    """A saved PipelineModel names the featurizer's class (``cxr_pipeline.spark.featurizer.ImageFeaturizer``):
    a run trained before issue 29 rearranged the package (this fixture) must still load and featurize."""
    from pyspark.ml import PipelineModel

    loaded = PipelineModel.load(str(SAVED_BEFORE_ISSUE_29))
    featurizer = loaded.stages[0]
    assert isinstance(featurizer, ImageFeaturizer)
    assert (featurizer.getFeatureLayer(), featurizer.getBatchSize(), featurizer.getImageSize()) == (LAYER, 4, 96)
    images = read_images(spark, str(tree)).where("path NOT LIKE '%text.jpeg' AND path NOT LIKE '%truncated.jpeg'")
    rows = loaded.transform(images).collect()
    assert len(rows) == 8 and all(r.featurize_error is None and len(r.features) > 0 for r in rows)


def test_filter_on_error_column_runs_the_model_once(spark, tree):
    featurized = ImageFeaturizer(featureLayer=LAYER).transform(read_images(spark, str(tree)))
    plan = featurized.where("featurize_error IS NULL")._jdf.queryExecution().executedPlan().toString()
    assert plan.count("ArrowEvalPython") == 1, plan


def test_featurizer_params_round_trip(spark, tmp_path):
    featurizer = ImageFeaturizer(
        inputCol="bytes",
        outputCol="vec",
        modelName="Xception",
        featureLayer="block4_pool",
        weights="hdfs://nn:9000/w/x.weights.h5",
        batchSize=8,
        maxPixels=1000,
        imageSize=128,
        intensity=OTHER_INTENSITY,
        arrowBatchSize=9,
        runtime="openvino",
        precision="bf16",
    )
    featurizer.save(str(tmp_path / "f"))
    loaded = ImageFeaturizer.load(str(tmp_path / "f"))
    for param in (
        "inputCol",
        "outputCol",
        "errorCol",
        "modelName",
        "featureLayer",
        "weights",
        "batchSize",
        "maxPixels",
        "imageSize",
        "intensity",
        "arrowBatchSize",
        "runtime",
        "precision",
    ):
        assert loaded.getOrDefault(param) == featurizer.getOrDefault(param), param
    assert loaded.getIntensity() == OTHER_INTENSITY  # set, saved and read back, not the default
    assert loaded.uid == featurizer.uid
    nulls = ImageFeaturizer(featureLayer=None, weights=None, weightsSha256=None, imageSize=None)  # null set explicitly
    nulls.save(str(tmp_path / "nulls"))
    loaded = ImageFeaturizer.load(str(tmp_path / "nulls"))
    assert loaded.isSet("featureLayer") and loaded.getFeatureLayer() is None and loaded.getImageSize() is None


def test_featurizer_settings_come_from_the_config_section_only():
    config = load_config(
        "local",
        overrides=[
            "featurizer.batch_size=5",
            "featurizer.arrow_batch_size=7",
            "featurizer.image_size=96",
            "data.max_pixels=1234",
            f"data.intensity={OTHER_INTENSITY}",
            "featurizer.runtime=openvino",
            "featurizer.precision=bf16",
        ],
    )
    settings = FeaturizerSettings.from_config(config)
    assert (settings.batch_size, settings.arrow_batch_size, settings.image_size, settings.max_pixels) == (
        5,
        7,
        96,
        1234,
    )
    from cxr_pipeline.spark.classifier.training import build_featurizer

    featurizer = build_featurizer(settings)
    assert (featurizer.getBatchSize(), featurizer.getArrowBatchSize(), featurizer.getMaxPixels()) == (5, 7, 1234)
    assert featurizer.getIntensity() == OTHER_INTENSITY and featurizer.worker_settings().intensity == OTHER_INTENSITY
    assert featurizer.getWeightsSha256()  # the provisioned file's, resolved on the driver
    assert (featurizer.getRuntime(), featurizer.getPrecision()) == ("openvino", "bf16")
    assert (featurizer.worker_settings().runtime, featurizer.worker_settings().precision) == ("openvino", "bf16")
    # An unset Param is the config default: nothing in the class restates it.
    defaults = FeaturizerSettings.from_config(load_config("local"))
    bare = ImageFeaturizer()
    assert {
        name: bare.getOrDefault(param)
        for param, name in [
            ("modelName", "model_name"),
            ("featureLayer", "feature_layer"),
            ("batchSize", "batch_size"),
            ("arrowBatchSize", "arrow_batch_size"),
            ("maxPixels", "max_pixels"),
            ("intensity", "intensity"),
            ("runtime", "runtime"),
            ("precision", "precision"),
        ]
    } == {
        "model_name": defaults.model_name,
        "feature_layer": defaults.feature_layer,
        "batch_size": defaults.batch_size,
        "arrow_batch_size": defaults.arrow_batch_size,
        "max_pixels": defaults.max_pixels,
        "intensity": defaults.intensity,
        "runtime": defaults.runtime,
        "precision": defaults.precision,
    }
    with pytest.raises(ConfigError, match="unknown featurizer option.*image_sise"):
        FeaturizerSettings.from_config({**config, "featurizer": {**config["featurizer"], "image_sise": 96}})
    with pytest.raises(ConfigError, match="missing.*arrow_batch_size"):
        FeaturizerSettings.from_config(
            {**config, "featurizer": {k: v for k, v in config["featurizer"].items() if k != "arrow_batch_size"}}
        )
    with pytest.raises(ConfigError, match="data.intensity must be one of"):
        FeaturizerSettings.from_config({**config, "data": {**config["data"], "intensity": "clahe"}})
    with pytest.raises(ConfigError, match="featurizer.runtime must be one of"):
        FeaturizerSettings.from_config({**config, "featurizer": {**config["featurizer"], "runtime": "tensorrt"}})
    with pytest.raises(ConfigError, match="bf16 runs on OpenVINO only"):
        FeaturizerSettings.from_config(
            {**config, "featurizer": {**config["featurizer"], "runtime": "onnxruntime", "precision": "bf16"}}
        )
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        FeaturizerSettings.from_config({**config, "featurizer": {**config["featurizer"], "batch_size": 0}})


def test_class_docstring_examples_run():
    import doctest

    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner()
    for test in finder.find(ImageFeaturizer, "ImageFeaturizer", globs={}):
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0 and runner.tries >= 3


def test_arrow_batches_follow_arrow_batch_size(spark, tree):
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    before = spark.conf.get(key)
    try:
        spark.conf.set(key, "10000")
        ImageFeaturizer(featureLayer=LAYER, arrowBatchSize=3).transform(read_images(spark, str(tree)))
        assert spark.conf.get(key) == "3"
    finally:
        spark.conf.set(key, before)


def test_missing_weights_file_fails_before_any_task(spark, tree):
    images = read_images(spark, str(tree))
    with pytest.raises(BackboneError, match="make weights"):
        ImageFeaturizer(weights="/no/such/inception.weights.h5").transform(images)


def test_unknown_backbone_is_rejected(spark, tree):
    with pytest.raises(BackboneError, match="unknown backbone"):
        ImageFeaturizer(modelName="VGG99").transform(read_images(spark, str(tree)))


def test_spark_image_source_input(spark, tree, featurized):
    """The image struct of Spark's own image source works as inputCol (JVM decoder: close, not equal)."""
    images = read_images_with_rejections(spark, str(tree), source="image").images
    rows = ImageFeaturizer(inputCol="image", featureLayer=LAYER, batchSize=4).transform(images).collect()
    reference = {r.path: r.features.toArray() for r in featurized if r.features is not None}
    good = [r for r in rows if r.features is not None]
    # Java's ImageIO is lenient with the truncated JPEG Pillow rejects; "text.jpeg" fails in both
    assert reference.keys() <= {r.path for r in good} and not any(r.path.endswith("text.jpeg") for r in good)
    assert all(r.featurize_error is None for r in good)
    for row in (r for r in good if r.path in reference):
        a, b = row.features.toArray(), reference[row.path]
        assert np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.98


@pytest.mark.hdfs
def test_weights_from_hdfs_are_fetched_by_executors(spark, tree, hdfs_tmp, featurized):
    from cxr_pipeline.models.weights import stage_to_hdfs

    uri = stage_to_hdfs("InceptionV3", f"{hdfs_tmp}/weights/")
    assert uri.startswith("hdfs://")
    images = read_images(spark, str(tree))
    rows = ImageFeaturizer(featureLayer=LAYER, weights=uri, batchSize=4).transform(images).collect()
    reference = {r.path: r.features.toArray() for r in featurized if r.features is not None}
    got = {r.path: r.features.toArray() for r in rows if r.features is not None}
    assert got.keys() == reference.keys()
    for path in got:
        assert_same_features(got[path], reference[path])


# Featurizing on a standalone cluster from HDFS, against plain Keras: test_faults.py (the undisturbed pass of its
# 2-worker cluster on a private HDFS) and the GPU-scheduling test below (a private cluster with resources).


def test_the_cached_model_is_out_of_the_cyclic_gcs_reach():
    """pyspark's daemon gc.collect()s after every task; the model a worker keeps must not be walked each time."""
    script = textwrap.dedent(
        f"""
        import gc, json
        from cxr_pipeline.spark import _udf
        settings = _udf.WorkerSettings(
            model_name="InceptionV3", feature_layer={LAYER!r}, weights="random", weights_spark_file=None,
            weights_sha256=None, batch_size=4, max_pixels=10**8, runtime="keras", precision="fp32",
            image_size=(75, 75),
        )
        model = _udf.cached_model(settings)
        frozen = gc.get_freeze_count()
        tracked = {{id(o) for o in gc.get_objects()}}
        again = _udf.cached_model(settings)
        print(json.dumps({{
            "frozen": frozen,
            "still_tracked": len(tracked),
            "model_tracked": id(model) in tracked,
            "layers_tracked": sum(id(layer) in tracked for layer in model.layers),
            "same_model": again is model,
            "frozen_after_reuse": gc.get_freeze_count(),
        }}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["same_model"]
    assert not report["model_tracked"] and report["layers_tracked"] == 0
    assert report["frozen"] > report["still_tracked"]  # the bulk of the worker's objects is frozen
    assert report["frozen_after_reuse"] == report["frozen"]  # a reused model is not frozen again


# ------------------------------------------------------------------ GPU executors (issue 16)
def test_device_choice_follows_the_task_gpu_addresses(monkeypatch):
    from pyspark.resource import ResourceInformation

    from cxr_pipeline.spark import _udf

    assert _udf.choose_device({"gpu": ResourceInformation("gpu", ["1"])}).gpu_addresses == ("1",)
    assert _udf.choose_device({"gpu": ["10", "2"]}).name == "GPU:2,10"
    assert _udf.choose_device({"fpga": ["0"]}).name == _udf.choose_device(None).name == "CPU"
    # a reused worker pinned to one GPU refuses a task given another (it would share or fight for a device)
    monkeypatch.setattr(_udf, "_PINNED", _udf.DeviceChoice(("0",)))
    monkeypatch.setattr(_udf, "_PLACED", "GPU:0")
    assert _udf.pin_tensorflow(_udf.DeviceChoice(("0",))) == "GPU:0"
    with pytest.raises(_udf.DevicePinningError, match="spark.task.resource.gpu.amount"):
        _udf.pin_tensorflow(_udf.DeviceChoice(("1",)))
    # ONNX Runtime / OpenVINO run on the CPU here: a task given a GPU says to use keras there
    _udf.require_cpu_task("onnxruntime", _udf.DeviceChoice())
    with pytest.raises(_udf.DevicePinningError, match="featurizer.runtime=keras on GPU executors"):
        _udf.require_cpu_task("onnxruntime", _udf.DeviceChoice(("0",)))


GPU_JOB = textwrap.dedent(
    """
    import json, sys
    from pyspark.sql import SparkSession
    from cxr_pipeline.spark.reader import read_images
    from cxr_pipeline.spark.featurizer import ImageFeaturizer

    master, data, script, out, lib = sys.argv[1:6]
    spark = (SparkSession.builder.master(master).appName("cxr-gpu-assignment-test")
             .config("spark.ui.enabled", "false").config("spark.executor.memory", "768m")
             .config("spark.executor.cores", "1").config("spark.cores.max", "2")
             .config("spark.executor.resource.gpu.amount", "1").config("spark.task.resource.gpu.amount", "1")
             .config("spark.executor.resource.gpu.discoveryScript", script)
             .config("spark.executorEnv.PYTHONPATH", lib).config("spark.scheduler.minRegisteredResourcesRatio", "1.0")
             .config("spark.scheduler.maxRegisteredResourcesWaitingTime", "120s")
             .config("spark.python.worker.reuse", "true").getOrCreate())
    featurizer = ImageFeaturizer(featureLayer="mixed0", imageSize=75, weights="random", batchSize=4, runtime="keras")
    stats = featurizer.track_stats(spark)
    rows = featurizer.transform(read_images(spark, data).repartition(6)).select("path", "featurize_error").collect()
    json.dump({"rows": len(rows), "tasks": stats.summary()["tasks"]}, open(out, "w"))
    spark.stop()
    """
)


@pytest.mark.slow
@pytest.mark.cluster
def test_each_task_runs_on_the_gpu_spark_assigned_it(tree, tmp_path):
    """Real standalone scheduling of placeholder GPUs: one worker offers addresses 0 and 1, two one-GPU
    executors take one each, and every task's featurizer chooses exactly its own address (no device here,
    so TensorFlow then runs on the CPU, which is recorded too)."""
    from cxr_pipeline.infra.localstack.faults import _free_port_run
    from cxr_pipeline.infra.localstack.processes import free_port
    from cxr_pipeline.infra.localstack.spark_cluster import LocalSparkStandalone

    script = tmp_path / "discover_gpus.sh"
    script.write_text('#!/bin/sh\necho \'{"name": "gpu", "addresses": ["0", "1"]}\'\n')
    script.chmod(0o755)
    cluster = LocalSparkStandalone(
        master_port=free_port(),
        web_port=_free_port_run(2),
        workers=1,
        cores=2,
        memory="2g",
        state_dir=tmp_path / "spark",
        worker_conf={"spark.worker.resource.gpu.amount": "2", "spark.worker.resource.gpu.discoveryScript": str(script)},
    )
    cluster.up(timeout=180)
    try:
        job = tmp_path / "job.py"
        job.write_text(GPU_JOB)
        out = tmp_path / "tasks.json"
        env = {
            **os.environ,
            "PYTHONPATH": f"{REPO / 'lib'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "PYSPARK_PYTHON": sys.executable,
            "PYSPARK_DRIVER_PYTHON": sys.executable,
        }
        done = subprocess.run(
            [sys.executable, str(job), cluster.master_url, str(tree), str(script), str(out), str(REPO / "lib")],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        cluster.down()
    result = json.loads(out.read_text())
    tasks = result["tasks"]
    assert result["rows"] == 10 and sum(t["images"] for t in tasks.values()) == 10
    assert len(tasks) == 6, tasks
    for task in tasks.values():
        assert len(task["gpu_addresses"]) == 1 and task["chosen"] == f"GPU:{task['gpu_addresses'][0]}", task
        assert task["placed"] == "CPU"  # placeholder addresses: TensorFlow sees no such GPU
    assert {t["gpu_addresses"][0] for t in tasks.values()} == {"0", "1"}  # the two executors, one GPU each
    by_process: dict[int, set] = {}
    for task in tasks.values():
        by_process.setdefault(task["pid"], set()).add(task["gpu_addresses"][0])
    assert all(len(addresses) == 1 for addresses in by_process.values()), by_process  # never two GPUs in one process
