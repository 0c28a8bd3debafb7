"""Batch prediction (jobs/predict.py) and the single-image command, on a real trained run.

The run is trained on the sample tree in the real local HDFS with the real
featurizer; the feature cache is shared with test_training.py in one pytest
session, so featurizing happens once.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import REPO
from tolerances import same_probability

pytestmark = [pytest.mark.slow, pytest.mark.hdfs]


@pytest.fixture(scope="module")
def run(sample_run):
    return sample_run


@pytest.fixture(scope="module")
def incoming(run, tmp_path_factory):
    """New images in a flat folder (no split/class layout) plus junk: a text file and a truncated JPEG."""
    from cxr_pipeline.infra import storage

    base, data, _ = run
    folder = f"{base}/incoming"
    if not storage.exists(folder):
        local = tmp_path_factory.mktemp("incoming")
        sources = sorted((Path(__file__).resolve().parents[1] / "data/sample/chest_xray/test").rglob("*.jpeg"))
        for src in sources:
            (local / src.name).write_bytes(src.read_bytes())
        (local / "notes.txt").write_text("not an image")
        (local / "broken.jpeg").write_bytes(sources[0].read_bytes()[:2000])
        storage.upload_dir(str(local), folder)
    return folder


def test_score_matches_in_memory_predictions(run, incoming, spark):
    from cxr_pipeline.spark.classifier import training as T
    from cxr_pipeline.spark.classifier.prediction import load_run, read_new_images, score

    _, data, result = run
    saved = load_run(result.run.root)
    out = {r["path"]: r for r in score(saved, read_new_images(spark, incoming)).collect()}
    assert len(out) == 6
    assert out[f"{incoming}/notes.txt"]["error"] == "not an image extension"
    broken = out[f"{incoming}/broken.jpeg"]
    assert broken["error"] and broken["probability"] is None
    from cxr_pipeline.spark.reader import read_image_tree

    in_memory = {
        r["path"].rsplit("/", 1)[-1]: r["p"]
        for r in T.with_scores(result.model.transform(read_image_tree(spark, data + "/test")))
        .selectExpr("path", f"{T.SCORE_COL} as p")
        .collect()
    }
    scored = {p.rsplit("/", 1)[-1]: r for p, r in out.items() if r["error"] is None}
    assert set(scored) == set(in_memory)
    for name, r in scored.items():
        assert r["probability"] == same_probability(in_memory[name])
        assert r["threshold"] == pytest.approx(result.metrics["threshold"]["threshold"])
        assert r["predicted_label"] == int(r["probability"] >= r["threshold"])
        assert r["predicted_class"] == ["NORMAL", "PNEUMONIA"][r["predicted_label"]]


def test_predict_job_writes_parquet_csv_and_unreadable_list(run, incoming, spark, hdfs_tmp):
    from cxr_pipeline.infra import storage

    _, data, result = run
    env = {**os.environ, "PYTHONPATH": str(REPO / "lib")}
    out = f"{hdfs_tmp}/pred"
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "spark-submit"),
            "--master",
            "local[2]",
            str(REPO / "jobs" / "predict.py"),
            "--model",
            result.run.root,
            "--images",
            incoming,
            "--out",
            out,
            "--csv",
            "--threshold",
            "0.5",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"predict: scoring {incoming} with {result.run.root} into {out}\n")
    assert "scored 4 image(s)" in proc.stdout and "unreadable 2" in proc.stdout
    for line in (f"predictions: {out}/predictions.parquet", f"predictions (CSV): {out}/predictions_csv"):
        assert line in proc.stdout.splitlines()  # every output, by the path it has after the job
    assert f"unreadable files: {out}/unreadable.csv" in proc.stdout.splitlines()
    written = {r["path"]: r for r in spark.read.parquet(out + "/predictions.parquet").collect()}
    assert len(written) == 6 and all(r["threshold"] == 0.5 for r in written.values())
    from cxr_pipeline.infra.tables import read_table  # what the job's last line tells a user to run

    for table in (read_table(f"{out}/predictions.parquet"), read_table(f"{out}/predictions_csv")):
        assert set(table["path"]) == set(written) and len(table) == 6
        scored = table.dropna(subset=["probability"]).set_index("path")["probability"]
        assert all(scored[path] == pytest.approx(written[path]["probability"]) for path in scored.index)
    csv_parts = [f.uri for f in storage.list_files(out + "/predictions_csv") if f.uri.endswith(".csv")]
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(csv_parts[0]).decode())))
    assert {r["path"] for r in rows} == set(written)
    unreadable = storage.read_bytes(out + "/unreadable.csv").decode()
    assert "notes.txt" in unreadable and "broken.jpeg" in unreadable
    # the job loaded the PipelineModel in a new Spark application: same probabilities as in memory
    from cxr_pipeline.spark.classifier import training as T
    from cxr_pipeline.spark.reader import read_image_tree

    in_memory = {
        r["path"].rsplit("/", 1)[-1]: r["p"]
        for r in T.with_scores(result.model.transform(read_image_tree(spark, data + "/test")))
        .selectExpr("path", f"{T.SCORE_COL} as p")
        .collect()
    }
    job = {p.rsplit("/", 1)[-1]: r["probability"] for p, r in written.items() if r["error"] is None}
    assert job.keys() == in_memory.keys()
    for name, p in job.items():
        assert p == same_probability(in_memory[name])
        assert written[f"{incoming}/{name}"]["predicted_label"] == int(p >= 0.5)


def test_single_image_command(run, sample_tree):
    from cxr_pipeline.infra import storage

    _, _, result = run
    spec = json.loads(storage.read_bytes(result.run.classifier))
    images = sorted(str(p) for p in (sample_tree / "test").rglob("*.jpeg"))[:2]
    env = {**os.environ, "PYTHONPATH": str(REPO / "lib")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cxr_pipeline.serving.predict_image",
            "--model",
            result.run.root,
            *images,
            "/nonexistent.jpeg",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]  # one file could not be read
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [x["file"] for x in lines] == [*images, "/nonexistent.jpeg"]
    for x in lines[:2]:
        assert x["error"] is None and 0.0 <= x["probability"] <= 1.0
        assert x["threshold"] == pytest.approx(spec["threshold"])
        assert x["label_name"] == spec["label_names"][int(x["probability"] >= spec["threshold"])]
    assert "cannot read" in lines[2]["error"]


@pytest.mark.parametrize("intensity", ["none", "equalize"])
def test_local_classifier_runs_the_backbone_at_the_exported_image_size(sample_tree, intensity):
    """A run trained with imageSize=96 (and an intensity mode) must be scored so, not at the backbone's 299."""
    import numpy as np

    from cxr_pipeline.images.decode import decode_image
    from cxr_pipeline.models.backbones import build_backbone, featurize_arrays
    from cxr_pipeline.spark.classifier.model_export import LocalClassifier, score_features

    dim = 256  # InceptionV3 mixed0 channels
    rng = np.random.default_rng(0)
    spec = {
        "model_name": "InceptionV3",
        "feature_layer": "mixed0",
        "image_size": [96, 96],
        "weights": "random",
        "max_pixels": None,
        "label_names": ["NORMAL", "PNEUMONIA"],
        "positive_label": "PNEUMONIA",
        "scaler": {"with_mean": True, "with_std": True, "mean": [0.0] * dim, "std": [1.0] * dim},
        "coefficients": rng.normal(size=dim).tolist(),
        "intercept": 0.1,
        "threshold": 0.5,
        "intensity": intensity,
    }
    content = next(sample_tree.glob("test/*/*.jpeg")).read_bytes()
    [result] = LocalClassifier(spec).predict_bytes([content])
    assert result["error"] is None

    reference = build_backbone("InceptionV3", weights="random", feature_layer="mixed0", image_size=96)
    pixels = decode_image(content, size=(96, 96), intensity=intensity)
    features = featurize_arrays(reference, "InceptionV3", pixels[None], 16)
    assert result["probability"] == same_probability(float(score_features(spec, features)[0]))
    if intensity != "none":  # can fail: the other decoding scores differently
        plain = featurize_arrays(reference, "InceptionV3", decode_image(content, size=(96, 96))[None], 16)
        assert result["probability"] != same_probability(float(score_features(spec, plain)[0]))


def test_single_image_command_help_names_every_format_it_reads():
    env = {**os.environ, "PYTHONPATH": str(REPO / "lib")}
    helped = subprocess.run(
        [sys.executable, "-m", "cxr_pipeline.serving.predict_image", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "DICOM" in helped.stdout and ".dcm" in helped.stdout
    assert "JPEG/PNG" not in helped.stdout
