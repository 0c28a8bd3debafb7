"""Answers that can be trusted (issue 10): a model is scored with the weights it was trained with
or not at all, half-written runs are refused, and the feature cache never serves stale features.

Uses the one trained run of the sample data that the training and prediction tests share (``sample_run``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import REPO, train_on_sample

from cxr_pipeline.infra import run_folder, storage
from cxr_pipeline.models.backbones import WeightsMismatchError

pytestmark = [pytest.mark.slow, pytest.mark.hdfs]


class Boom(RuntimeError):
    pass


@pytest.fixture(scope="module")
def trained(sample_run):
    return sample_run


@pytest.fixture
def local_copy(trained, tmp_path) -> Path:
    """The trained run copied to a local folder that a test may damage."""
    _, _, result = trained
    local = tmp_path / "run"
    storage.download_dir(result.run.root, local)
    return local


def _edit_spec(run: Path, **changes) -> None:
    spec = json.loads((run / "classifier.json").read_text())
    (run / "classifier.json").write_text(json.dumps({**spec, **changes}))


def test_the_run_records_the_sha256_of_its_weights(trained):
    from cxr_pipeline.models.backbones import file_sha256
    from cxr_pipeline.models.weights import default_weights_path

    _, _, result = trained
    expected = file_sha256(default_weights_path("InceptionV3"))
    spec = json.loads(storage.read_bytes(result.run.classifier))
    assert spec["weights_sha256"] == expected
    assert result.metrics["featurizer"]["weights_sha256"] == expected
    assert result.model.stages[0].getWeightsSha256() == expected


def test_replaced_or_missing_weights_are_refused_at_load_not_swapped(local_copy):
    from cxr_pipeline.spark.classifier.model_export import LocalClassifier

    LocalClassifier.load(str(local_copy))  # intact: loads
    _edit_spec(local_copy, weights_sha256="0" * 64)  # as if the provisioned file had been replaced
    with pytest.raises(WeightsMismatchError, match="trained"):
        LocalClassifier.load(str(local_copy))
    _edit_spec(local_copy, weights="finetuned.weights.h5", weights_uri="/gone/finetuned.weights.h5")
    with pytest.raises(FileNotFoundError, match="finetuned.weights.h5"):  # not "the provisioned default"
        LocalClassifier.load(str(local_copy))


def test_incomplete_runs_are_refused_by_every_reader(local_copy, sample_tree):
    from cxr_pipeline.spark.classifier.model_export import LocalClassifier
    from cxr_pipeline.spark.classifier.prediction import load_run

    (local_copy / run_folder.SUCCESS_FILE).unlink()
    with pytest.raises(run_folder.IncompleteRunError, match="_SUCCESS"):
        LocalClassifier.load(str(local_copy))
    with pytest.raises(run_folder.IncompleteRunError):
        load_run(str(local_copy))
    image = next(sample_tree.glob("test/*/*.jpeg"))
    env = {**os.environ, "PYTHONPATH": str(REPO / "lib")}
    cli = subprocess.run(
        [sys.executable, "-m", "cxr_pipeline.serving.predict_image", "--model", str(local_copy), str(image)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert cli.returncode == 2 and "_SUCCESS" in cli.stderr, cli.stderr[-2000:]
    job = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "predict.py"),
            "--model",
            str(local_copy),
            "--images",
            str(image.parent),
            "--out",
            str(local_copy.parent / "pred"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert job.returncode == 2 and "_SUCCESS" in job.stderr, job.stderr[-2000:]


def test_featurizer_refuses_other_weights_on_the_driver(spark, sample_tree):
    from cxr_pipeline.spark.featurizer import ImageFeaturizer
    from cxr_pipeline.spark.reader import read_images

    images = read_images(spark, str(sample_tree / "test"))
    featurizer = ImageFeaturizer(featureLayer="mixed0", weightsSha256="0" * 64)
    with pytest.raises(WeightsMismatchError):
        featurizer.transform(images)


def test_executors_refuse_a_replaced_hdfs_weights_file(spark, sample_tree, hdfs_tmp):
    from pyspark.errors import PythonException

    from cxr_pipeline.models.backbones import file_sha256
    from cxr_pipeline.models.weights import default_weights_path, stage_to_hdfs
    from cxr_pipeline.spark.featurizer import ImageFeaturizer
    from cxr_pipeline.spark.reader import read_images

    uri = stage_to_hdfs("InceptionV3", f"{hdfs_tmp}/weights/")
    right = file_sha256(default_weights_path("InceptionV3"))
    images = read_images(spark, str(sample_tree / "test")).limit(2)
    ok = ImageFeaturizer(featureLayer="mixed0", weights=uri, weightsSha256=right).transform(images).collect()
    assert all(r.featurize_error is None for r in ok)
    with pytest.raises((PythonException, Exception), match="WeightsMismatchError|trained with"):
        ImageFeaturizer(featureLayer="mixed0", weights=uri, weightsSha256="0" * 64).transform(images).collect()


def test_retraining_into_a_run_is_refused_and_a_failed_overwrite_changes_nothing(trained, spark, monkeypatch):
    from cxr_pipeline.spark.classifier import model_export

    base, data, first = trained
    before = storage.read_bytes(first.run.classifier)
    with pytest.raises(run_folder.OutputExistsError, match="--overwrite"):
        train_on_sample(spark, base, data, first.run.root.rsplit("/", 1)[-1])

    def die(*args, **kwargs):
        raise Boom("killed while exporting, after model/ was written")

    monkeypatch.setattr(model_export, "export_classifier", die)
    with pytest.raises(Boom):
        train_on_sample(spark, base, data, first.run.root.rsplit("/", 1)[-1], overwrite=True)
    assert storage.read_bytes(first.run.classifier) == before
    assert run_folder.is_complete(first.run.root)
    name = first.run.root.rsplit("/", 1)[-1]
    leftovers = [f.uri for f in storage.list_files(base, recursive=True) if f".{name}." in f.uri]
    assert leftovers == [], leftovers


def test_changed_decoding_settings_are_featurized_again_not_served_stale(trained, spark):
    base, data, first = trained
    result = train_on_sample(spark, base, data, "run_other_pixel_guard", ["data.max_pixels=50000000"])
    cache = result.metrics["featurizer"]["cache"]
    assert cache["reused_rows"] == 0 and cache["featurized_rows"] == 16, cache
    assert "maxPixels" in cache["reason"], cache["reason"]
    assert cache["uri"] != first.metrics["featurizer"]["cache"]["uri"]


# ------------------------------------------------------------------ the cache itself, on a tiny local tree


def _cache_run(spark, tree, root, featurizer=None):
    from cxr_pipeline.spark.feature_cache import FeatureCache, fingerprint
    from cxr_pipeline.spark.featurizer import ImageFeaturizer
    from cxr_pipeline.spark.reader import read_images_with_rejections

    featurizer = featurizer or ImageFeaturizer(featureLayer="mixed0", weights="random", imageSize=75, batchSize=4)
    stats = featurizer.track_stats(spark)
    cache = FeatureCache(root, str(tree), fingerprint(featurizer, "binaryFile"))
    features, outcome, snapshot = cache.features_for(spark, read_images_with_rejections(spark, str(tree)), featurizer)
    rows = {r.path.rsplit("/", 1)[-1]: r.features.toArray() for r in features.collect()}
    return rows, outcome, stats.summary()["images"], cache, snapshot


@pytest.mark.parametrize("change", ["add_and_remove", "replace_in_place"])
def test_cache_featurizes_only_new_or_changed_images(spark, tmp_path, change):
    import numpy as np
    from test_reader import jpeg_bytes, make_tree

    tree = tmp_path / "tree"
    make_tree(tree, per_class=3, junk=False)
    root = str(tmp_path / "cache")
    first, outcome, seen, _, _ = _cache_run(spark, tree, root)
    assert len(first) == 12 and seen == 12 and outcome.featurized_rows == 12 and outcome.reused_rows == 0
    folder = tree / "train" / "NORMAL"
    victim = sorted(folder.glob("*.jpeg"))[0]
    if change == "add_and_remove":
        (folder / "person99_new.jpeg").write_bytes(jpeg_bytes(99))
        victim.unlink()
        expected = {"featurized": 1, "reused": 11, "dropped": 1}
    else:  # same name, other pixels: path alone would serve the old features
        victim.write_bytes(jpeg_bytes(77))
        expected = {"featurized": 1, "reused": 11, "dropped": 1}
    second, outcome, seen, cache, snapshot = _cache_run(spark, tree, root)
    assert seen == 1, "only the new or changed image may go through the model"
    assert (outcome.featurized_rows, outcome.reused_rows, outcome.dropped_rows) == tuple(expected.values())
    assert set(second) == {p.name for p in tree.rglob("*.jpeg")}
    for name in set(first) & set(second) - {victim.name}:
        np.testing.assert_array_equal(second[name], first[name])  # reused rows are the cached ones, bit for bit
    if change == "replace_in_place":
        assert not np.allclose(second[victim.name], first[victim.name])
    third, outcome, seen, _, _ = _cache_run(spark, tree, root)
    assert seen == 0 and outcome.reused_rows == 12 and outcome.reason == "every image and every setting matched"
    assert third.keys() == second.keys()


def test_cache_never_deletes_a_snapshot_another_run_is_reading(spark, tmp_path):
    from test_reader import jpeg_bytes, make_tree

    tree = tmp_path / "tree"
    make_tree(tree, per_class=2, junk=False)
    root = str(tmp_path / "cache")
    _, _, _, cache, old = _cache_run(spark, tree, root)
    with cache.lease(old):  # another run is still reading the old snapshot
        (tree / "train" / "NORMAL" / "person50_new.jpeg").write_bytes(jpeg_bytes(50))
        _, _, _, cache2, new = _cache_run(spark, tree, root)
        assert new != old
        assert cache2.prune(keep=new) == []
        assert storage.exists(old + "/_SUCCESS")
    assert cache2.prune(keep=new) == [old.rsplit("/", 1)[-1]]
    assert storage.exists(new + "/_SUCCESS") and not storage.exists(old)


# A run that SIGKILLs itself while it holds a lease on a cache snapshot: its lease file stays behind.
LEASE_AND_DIE = """
import os, signal, sys
from cxr_pipeline.spark.feature_cache import FeatureCache
cache = FeatureCache(sys.argv[1], sys.argv[2], {"test": "leases"}, lease_hours=48)
with cache.lease(sys.argv[3]):
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_next_run_removes_expired_leases_of_killed_runs_and_nothing_else(hdfs_tmp):
    from cxr_pipeline.spark.feature_cache import FeatureCache

    root, data = f"{hdfs_tmp}/cache", "hdfs://127.0.0.1:9000/data/leases"
    cache = FeatureCache(root, data, {"test": "leases"}, lease_hours=48)
    current, superseded = f"{cache.uri}/snap-2-bbbbbbbb", f"{cache.uri}/snap-1-aaaaaaaa"
    for snapshot in (current, superseded):
        storage.write_bytes(f"{snapshot}/_SUCCESS", b"")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "lib"), os.environ.get("PYTHONPATH", "")])}
        child = subprocess.run([sys.executable, "-c", LEASE_AND_DIE, root, data, snapshot], env=env, timeout=300)
        assert child.returncode == -9
    storage.write_bytes(f"{current}/_readers/notes.txt", b"not a lease")

    def readers() -> list[str]:
        return sorted(info.name for info in storage.list_files(f"{current}/_readers"))

    assert len(readers()) == 2
    assert cache.prune(keep=current) == []  # within lease_hours a killed run's lease still counts
    assert len(readers()) == 2

    later = FeatureCache(root, data, {"test": "leases"}, lease_hours=0)  # every lease is past its age now
    with later.lease(current):  # ... but this run, alive on this host, still reads
        assert later.prune(keep=current) == [superseded.rsplit("/", 1)[1]]
        assert readers() == sorted(["notes.txt", later.run_id])
