"""Reading image trees (local and the real local HDFS) and packed image tables."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_pipeline.spark.reader import classify_path, read_images, read_images_with_rejections

CLASSES = ("NORMAL", "PNEUMONIA")


def jpeg_bytes(seed: int, size=(40, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8), mode="L").save(buffer, "JPEG")
    return buffer.getvalue()


def make_tree(root: Path, per_class: int = 2, classes=CLASSES, junk: bool = True) -> dict[str, str]:
    """A tiny chest_xray tree; returns {relative path: expected rejection reason} for the junk."""
    seed = 0
    for split in ("train", "test"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                seed += 1
                (folder / f"person{seed}_img{i}.jpeg").write_bytes(jpeg_bytes(seed))
    if not junk:
        return {}
    good = (root / "train" / classes[0] / "person1_img0.jpeg").read_bytes()
    (root / "train" / classes[0] / "empty.jpeg").write_bytes(b"")
    (root / "train" / classes[0] / "notes.txt").write_text("not an image")
    (root / "stray.jpeg").write_bytes(good)
    # content-level junk: the reader keeps it, the featurizer reports it
    (root / "train" / classes[1] / "text.jpeg").write_bytes(b"hello, I am text")
    (root / "test" / classes[0] / "truncated.jpeg").write_bytes(good[: len(good) // 2])
    return {
        "train/NORMAL/empty.jpeg": "zero-byte file",
        "train/NORMAL/notes.txt": "not an image extension",
        "stray.jpeg": "not in a <split>/<CLASS>/ folder",
    }


def rel(uri: str) -> str:
    parts = uri.split("/")
    return "/".join(parts[-3:]) if parts[-3] in ("train", "val", "test") else parts[-1]


PATH_CASES = [
    ("hdfs://nn:9000/d/chest_xray/train/NORMAL/a.jpeg", 10, ("train", "NORMAL", None)),
    ("file:/d/test/PNEUMONIA/b.JPG", 10, ("test", "PNEUMONIA", None)),
    ("s3a://bucket/val/COVID/x.png", 10, ("val", "COVID", None)),
    ("hdfs://nn:9000/d/chest_xray/train/NORMAL/a.jpeg", 0, (None, None, "zero-byte file")),
    ("/d/chest_xray/train/NORMAL/readme.md", 5, (None, None, "not an image extension")),
    ("/d/chest_xray/train/NORMAL/.a.jpeg", 5, (None, None, "hidden file")),
    ("/d/chest_xray/NORMAL/a.jpeg", 5, (None, None, "not in a <split>/<CLASS>/ folder")),
    ("hdfs://nn:9000/NORMAL/a.jpeg", 5, (None, None, "not in a <split>/<CLASS>/ folder")),
    ("file:/train/a.jpeg", 5, (None, None, "not in a <split>/<CLASS>/ folder")),
    ("/d/training/NORMAL/a.jpeg", 5, (None, None, "not in a <split>/<CLASS>/ folder")),
    ("train/NORMAL/a.jpeg", 5, ("train", "NORMAL", None)),
    ("NORMAL/a.jpeg", 5, (None, None, "not in a <split>/<CLASS>/ folder")),
    ("a.jpeg", 5, (None, None, "not in a <split>/<CLASS>/ folder")),
    ("/train/NORMAL/", 5, (None, None, "not in a <split>/<CLASS>/ folder")),
]


@pytest.mark.parametrize("path, length, expected", PATH_CASES)
def test_classify_path(path, length, expected):
    assert classify_path(path, length) == expected


def test_sql_classification_agrees_with_python(spark):
    from pyspark.sql import functions as F

    from cxr_pipeline.spark.reader import classify_column

    frame = spark.createDataFrame([(p, n) for p, n, _ in PATH_CASES], "path string, length long")
    got = frame.select(classify_column(F.col("path"), F.col("length")).alias("m")).collect()
    assert [tuple(row.m) for row in got] == [expected for _, _, expected in PATH_CASES]


def test_tree_labels_split_and_rejections(spark, tmp_path):
    expected_junk = make_tree(tmp_path)
    result = read_images_with_rejections(spark, str(tmp_path))
    assert result.label_names == ("NORMAL", "PNEUMONIA")
    rows = result.images.collect()
    assert list(result.images.columns) == ["path", "split", "label", "label_name", "content", "length", "identity"]
    assert result.count_images() == 10 == result.image_count
    # 8 good + the two content-level bad files (text.jpeg, truncated.jpeg)
    assert len(rows) == 10
    for row in rows:
        split, label_name = row.path.split("/")[-3:-1]
        assert (row.split, row.label_name) == (split, label_name)
        assert row.label == {"NORMAL": 0, "PNEUMONIA": 1}[label_name]
        assert row.length == len(row.content) > 0
        assert row.path.startswith("file:")
        stat = (tmp_path / rel(row.path)).stat()
        size, seconds = row.identity.split("|")
        assert int(size) == stat.st_size and float(seconds) == pytest.approx(stat.st_mtime, abs=1.0)
    rejected = {rel(r.path): r.reason for r in result.rejected.collect()}
    assert rejected == expected_junk
    assert result.patients is None  # no DICOM header to read: no extra pass, patients are the file names


def test_any_number_of_classes_sorted(spark, tmp_path):
    make_tree(tmp_path, per_class=1, classes=("PNEUMONIA", "COVID", "NORMAL"), junk=False)
    result = read_images_with_rejections(spark, str(tmp_path))
    assert result.label_names == ("COVID", "NORMAL", "PNEUMONIA")
    labels = {(r.label_name, r.label) for r in result.images.select("label_name", "label").collect()}
    assert labels == {("COVID", 0), ("NORMAL", 1), ("PNEUMONIA", 2)}


def test_fixed_label_names_reject_unknown_classes(spark, tmp_path):
    make_tree(tmp_path, per_class=1, classes=("NORMAL", "PNEUMONIA", "COVID"), junk=False)
    result = read_images_with_rejections(spark, str(tmp_path), label_names=["PNEUMONIA", "NORMAL"])
    assert result.label_names == ("NORMAL", "PNEUMONIA")
    assert result.images.count() == 4
    reasons = [r.reason for r in result.rejected.collect()]
    assert len(reasons) == 2 and all("class folder not in" in r for r in reasons)


def test_spark_image_source(spark, tmp_path):
    make_tree(tmp_path, per_class=1, junk=False)
    (tmp_path / "train" / "NORMAL" / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    result = read_images_with_rejections(spark, str(tmp_path), source="image")
    assert "image" in result.images.columns and "content" not in result.images.columns
    assert not result.listing_only_paths  # its paths come out of decoding: counting them is not done in one task
    rows = result.images.collect()
    assert len(rows) == 4
    assert all(r.image.height == 32 and r.image.width == 40 for r in rows)
    # the same files' identities as binaryFile gives them: a cache filled from either source stays valid
    by_binary = dict(read_images_with_rejections(spark, str(tmp_path)).identities().collect())
    assert {r.path: r.identity for r in rows}.items() <= by_binary.items()
    assert [(rel(r.path), r.reason) for r in result.rejected.collect()] == [
        ("train/NORMAL/broken.jpeg", "not decodable by Spark's image source")
    ]


def tasks_per_job(spark, action) -> list[int]:
    """Run ``action``; the number of tasks of each Spark job it started (status tracker, skipped stages left out)."""
    context, group = spark.sparkContext, f"count-tasks-{id(action)}"
    context.setJobGroup(group, "counting tasks")
    try:
        action()
    finally:
        context.setLocalProperty("spark.jobGroup.id", None)
    tracker = context.statusTracker()
    jobs = sorted(tracker.getJobIdsForGroup(group))
    return [sum(tracker.getStageInfo(s).numTasks for s in tracker.getJobInfo(j).stageIds) for j in jobs]


def test_listing_only_queries_run_in_one_task_however_binaryfile_splits_the_tree(spark, tmp_path):
    make_tree(tmp_path, per_class=3, junk=False)
    previous = spark.conf.get("spark.sql.files.maxPartitionBytes")
    spark.conf.set("spark.sql.files.maxPartitionBytes", "1")  # every file its own task when bytes are read
    try:
        listing = tasks_per_job(spark, lambda: read_images_with_rejections(spark, str(tmp_path)))
        assert listing == [1], listing  # the classes, any DICOM, the image count: one query
        result = read_images_with_rejections(spark, str(tmp_path))
        # first, as a DataFrame runs its broadcasts once: here the scanned paths' (for zero-byte files), then the union
        assert tasks_per_job(spark, result.rejected.collect) == [1, 1]
        assert result.images.rdd.getNumPartitions() == 12
        assert result.listing_only_paths
        assert tasks_per_job(spark, result.count_images) == []  # counted by the listing
        assert result.count_images() == 12 == result.labelled_paths().count()
        assert result.labelled_paths().rdd.getNumPartitions() == 1
        assert result.rejected.rdd.getNumPartitions() == 1
        identities = result.identities()
        assert identities.rdd.getNumPartitions() == 1 and identities.count() == 12
    finally:
        spark.conf.set("spark.sql.files.maxPartitionBytes", previous)


@pytest.mark.hdfs
def test_tree_in_real_hdfs(spark, tmp_path, hdfs_tmp):
    from cxr_pipeline.infra import storage

    expected_junk = make_tree(tmp_path)
    storage.upload_dir(str(tmp_path), f"{hdfs_tmp}/chest_xray")
    result = read_images_with_rejections(spark, f"{hdfs_tmp}/chest_xray")
    rows = result.images.select("path", "label", "content").collect()
    assert len(rows) == 10 and all(r.path.startswith("hdfs://") for r in rows)
    for row in rows:
        assert row.content == (tmp_path / rel(row.path)).read_bytes()
    assert {rel(r.path): r.reason for r in result.rejected.collect()} == expected_junk


def test_pack_and_read_table(spark, tmp_path):
    from cxr_pipeline.spark.packing import pack_image_tree

    tree = tmp_path / "tree"
    make_tree(tree)
    # an exact duplicate under another name
    (tree / "test" / "PNEUMONIA" / "copy.jpeg").write_bytes(
        (tree / "train" / "NORMAL" / "person1_img0.jpeg").read_bytes()
    )
    table = str(tmp_path / "table")
    summary = pack_image_tree(spark, str(tree), table)
    # text.jpeg has no readable header: rejected at packing; truncated.jpeg has one: kept
    assert summary.images == 10 and summary.rejected == 4
    assert (summary.duplicate_groups, summary.duplicate_images) == (1, 2)
    packed = read_images(spark, table, source="parquet")
    from_tree = {r.path: r for r in read_images(spark, str(tree)).collect()}
    rows = packed.collect()
    assert len(rows) == 10
    for row in rows:
        original = from_tree[row.path]
        assert (row.split, row.label, row.label_name, row.content) == (
            original.split,
            original.label,
            original.label_name,
            original.content,
        )
        assert row.identity == hashlib.sha256(row.content).hexdigest()  # a table's rows: identified by their bytes
    full = spark.read.parquet(table)
    older = str(tmp_path / "older")  # packed before tables had a sha256 column: the reader hashes the bytes
    full.drop("sha256").write.parquet(older)
    assert {r.path: r.identity for r in read_images(spark, older, source="parquet").collect()} == {
        r.path: r.identity for r in rows
    }
    assert {"width", "height", "sha256", "format"} <= set(full.columns)
    assert full.where("width = 40 AND height = 32").count() == 10
    rejected = spark.read.option("header", True).csv(f"{table}/_rejected")
    assert "text.jpeg" in {r.path.split("/")[-1] for r in rejected.collect()}
