"""Dataset statistics for the explore notebook: pure summaries, and the Spark side on a real session."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr_pipeline.notebook_support import exploration as ex


def jpeg_bytes(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (height, width), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def stats_frame(rows):
    return pd.DataFrame(rows, columns=ex.STATS_COLUMNS)


STATS = stats_frame(
    [
        ("/d/train/NORMAL/a.jpeg", "train", "NORMAL", 300_000, 1500, 1200, "JPEG", None),
        ("/d/train/NORMAL/b.jpeg", "train", "NORMAL", 400_000, 1600, 1300, "JPEG", None),
        ("/d/train/PNEUMONIA/c.jpeg", "train", "PNEUMONIA", 80_000, 1000, 700, "JPEG", None),
        ("/d/train/PNEUMONIA/d.jpeg", "train", "PNEUMONIA", 100_000, 1100, 800, "JPEG", None),
        ("/d/train/PNEUMONIA/e.jpeg", "train", "PNEUMONIA", 90_000, None, None, None, "truncated image"),
        ("/d/test/PNEUMONIA/f.jpeg", "test", "PNEUMONIA", 120_000, 1200, 900, "JPEG", None),
        ("/d/val/NORMAL/g.jpeg", "val", "NORMAL", 350_000, 1400, 1100, "JPEG", None),
    ]
)


def test_describe_image_good_and_truncated():
    data = jpeg_bytes(40, 30)
    assert ex.describe_image(data) == {"width": 40, "height": 30, "format": "JPEG", "error": None}
    broken = ex.describe_image(data[: len(data) // 2])
    assert broken["width"] == 40 and broken["error"] and "truncated" in broken["error"]
    assert ex.describe_image(b"hello")["error"] == "not an image"
    assert ex.describe_image(b"")["error"] == "zero-byte file"


def test_counts_by_split_class_orders_splits_and_skips_bad_images():
    counts = ex.counts_by_split_class(STATS)
    assert list(counts.index) == ["train", "val", "test", "all"]
    assert counts.loc["train", "PNEUMONIA"] == 2  # the truncated one is not counted
    assert counts.loc["test", "NORMAL"] == 0
    assert counts.loc["all", "total"] == 6


def test_size_summary_ratio_and_separability():
    summary = ex.size_summary(STATS).set_index("label_name")
    assert summary.loc["NORMAL", "images"] == 3
    assert summary.loc["NORMAL", "file_kb_median"] == pytest.approx(350_000 / 1024, abs=1e-3)
    assert summary.loc["PNEUMONIA", "width_median"] == 1100
    assert ex.file_size_ratio(STATS) == pytest.approx(350_000 / 100_000)
    assert ex.file_size_separability(STATS) == pytest.approx(1.0)
    mixed = STATS.assign(file_size=[100, 300, 200, 400, 1, 50, 250])
    assert ex.file_size_separability(mixed) < 1.0
    assert ex.file_size_ratio(STATS[STATS.label_name == "NORMAL"]) is None


def test_problem_files_lists_reader_and_decode_rejections():
    overview = ex.Overview(
        stats=STATS, rejected=pd.DataFrame({"path": ["/d/train/NORMAL/.DS_Store"], "reason": ["hidden file"]})
    )
    problems = ex.problem_files(overview)
    assert problems.to_dict("records") == [
        {"path": "/d/train/NORMAL/.DS_Store", "stage": "reader", "reason": "hidden file"},
        {"path": "/d/train/PNEUMONIA/e.jpeg", "stage": "decode", "reason": "truncated image"},
    ]
    assert len(overview.good) == 6


def test_plots_render(tmp_path):
    samples = pd.DataFrame(
        {
            "path": ["/x/NORMAL/a.jpeg", "/x/NORMAL/b.jpeg", "/x/PNEUMONIA/c.jpeg"],
            "label_name": ["NORMAL", "NORMAL", "PNEUMONIA"],
            "content": [jpeg_bytes(60, 40), b"junk", jpeg_bytes(50, 50, 1)],
        }
    )
    thumb = ex.thumbnail(samples["content"][0], height=20)
    assert thumb.shape == (20, 30, 3)
    assert ex.thumbnail(b"junk") is None
    for name, fig in {
        "counts": ex.plot_counts(ex.counts_by_split_class(STATS)),
        "grid": ex.plot_sample_grid(samples, thumb_height=32),
        "sizes": ex.plot_size_distributions(STATS),
    }.items():
        path = tmp_path / f"{name}.png"
        fig.savefig(path)
        assert path.stat().st_size > 2000


@pytest.fixture
def tiny_tree(tmp_path):
    root = tmp_path / "chest_xray"
    files = {
        "train/NORMAL/n1.jpeg": jpeg_bytes(64, 48, 1, quality=95),
        "train/NORMAL/n2.jpeg": jpeg_bytes(64, 48, 2, quality=95),
        "train/PNEUMONIA/p1.jpeg": jpeg_bytes(40, 40, 3, quality=30),
        "test/PNEUMONIA/p2.jpeg": truncated(jpeg_bytes(40, 40, 4, quality=30)),
        "test/NORMAL/n3.jpeg": jpeg_bytes(64, 48, 5, quality=95),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_image_stats_on_spark(spark, tiny_tree):
    from pyspark.sql import functions as F

    raw = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(str(tiny_tree))
    images = raw.select(
        "path",
        "content",
        "length",
        F.element_at(F.split("path", "/"), -3).alias("split"),
        F.element_at(F.split("path", "/"), -2).alias("label_name"),
    )
    stats = ex.image_stats(images).toPandas()
    stats["rel"] = stats["path"].str.split("chest_xray/").str[1]
    stats = stats.set_index("rel")
    assert len(stats) == 5
    assert stats.loc["train/NORMAL/n1.jpeg", "width"] == 64 and stats.loc["train/NORMAL/n1.jpeg", "height"] == 48
    assert stats.loc["train/NORMAL/n1.jpeg", "file_size"] == (tiny_tree / "train/NORMAL/n1.jpeg").stat().st_size
    assert "truncated" in stats.loc["test/PNEUMONIA/p2.jpeg", "error"]
    assert stats["error"].notna().sum() == 1
    counts = ex.counts_by_split_class(stats.reset_index(drop=True))
    assert counts.loc["train", "NORMAL"] == 2 and counts.loc["test", "PNEUMONIA"] == 0

    samples = ex.sample_images(images, per_class=2, seed=3)
    assert samples.groupby("label_name").size().to_dict() == {"NORMAL": 2, "PNEUMONIA": 2}
    assert samples.equals(ex.sample_images(images, per_class=2, seed=3))  # stable pick
    bad = stats.loc[stats["error"].notna(), "path"]
    picked = ex.sample_images(images, per_class=5, exclude=bad)
    assert len(picked) == 4 and set(bad).isdisjoint(picked["path"])


@pytest.mark.hdfs
def test_dataset_overview_on_hdfs(spark, hdfs_tmp, tiny_tree):
    from cxr_pipeline.infra import storage

    (tiny_tree / "train" / "NORMAL" / "notes.txt").write_bytes(b"junk")
    (tiny_tree / "test" / "NORMAL" / "empty.jpeg").write_bytes(b"")
    uri = f"{hdfs_tmp}/chest_xray"
    storage.upload_dir(str(tiny_tree), uri)
    overview = ex.dataset_overview(spark, uri)
    assert len(overview.stats) == 5
    assert overview.stats["path"].str.startswith("hdfs://").all()
    problems = ex.problem_files(overview)
    reasons = dict(zip(problems["path"].str.rsplit("/", n=1).str[-1], problems["reason"]))
    assert set(reasons) == {"notes.txt", "empty.jpeg", "p2.jpeg"}
    assert "truncated" in reasons["p2.jpeg"]
    assert "zero-byte" in reasons["empty.jpeg"]  # Spark's binaryFile skips it; the reader lists it
    assert ex.file_size_ratio(overview.stats) > 1.0
