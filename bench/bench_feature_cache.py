#!/usr/bin/env python3
"""What a daily re-train costs with the incremental feature cache: add 10 % new images, re-run.

On a synthetic tree (cxr_pipeline.datasets.synthetic) and one Spark session, times
``FeatureCache.features_for`` (listing, cache comparison, featurizing what is new, writing
the new snapshot, reading it back) for:

  full     an empty cache: every image goes through the model
  +10 %    the same tree with 10 % new images: only those are featurized
  same     nothing changed: the snapshot is reused as it is

and prints each one's seconds, the images that went through the model and the re-runs'
time as a share of the full run's (measured in one run; the machine is shared, so compare
the shares, not the seconds).

    PYTHONPATH=lib .venv/bin/python bench/bench_feature_cache.py [--n 300] [--size 1024x1024]
        [--image-size 150] [--layer mixed5] [--master local[2]]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import _bench_env  # noqa: F401 - lib/ importable, the local Spark environment


def timed_pass(spark, tree: Path, cache_root: str, featurizer) -> tuple[float, int, object]:
    from cxr_pipeline.spark.feature_cache import FeatureCache, fingerprint
    from cxr_pipeline.spark.reader import read_images_with_rejections

    stats = featurizer.track_stats(spark)
    started = time.perf_counter()
    cache = FeatureCache(cache_root, str(tree), fingerprint(featurizer, "binaryFile"))
    features, outcome, _ = cache.features_for(spark, read_images_with_rejections(spark, str(tree)), featurizer)
    features.write.format("noop").mode("overwrite").save()  # what training reads next
    return time.perf_counter() - started, stats.summary()["images"], outcome


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="images in the first tree")
    parser.add_argument("--size", default="1024x1024", help="synthetic JPEG size WIDTHxHEIGHT")
    parser.add_argument("--image-size", type=int, default=150, help="featurizer input side (smaller = faster)")
    parser.add_argument("--layer", default="mixed5")
    parser.add_argument("--master", default="local[2]")
    args = parser.parse_args(argv)

    from pyspark.sql import SparkSession

    from cxr_pipeline.datasets.synthetic import generate, parse_size
    from cxr_pipeline.spark.featurizer import ImageFeaturizer

    width, height = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    tree, extra = work / "chest_xray", work / "extra"
    generate(tree, args.n, width, height, seed=0)
    generate(extra, max(1, args.n // 10), width, height, seed=1)  # the next day's 10 %: other images

    spark = (
        SparkSession.builder.master(args.master)
        .appName("bench-feature-cache")
        .config("spark.ui.enabled", "false")
        .config("spark.python.worker.reuse", "true")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    featurizer = ImageFeaturizer(featureLayer=args.layer, imageSize=args.image_size, batchSize=16)
    cache_root = str(work / "cache")
    try:
        timed_pass(spark, extra, str(work / "warm-up"), featurizer)  # workers start and build the model
        full = timed_pass(spark, tree, cache_root, featurizer)
        for path in sorted(extra.rglob("*.jpeg")):  # the new day's images appear in the tree
            target = tree / path.parent.relative_to(extra) / f"day2_{path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
        grown = timed_pass(spark, tree, cache_root, featurizer)
        same = timed_pass(spark, tree, cache_root, featurizer)
    finally:
        spark.stop()

    print(
        f"\nfeature cache, {args.n} synthetic {args.size} JPEGs, InceptionV3 {args.layer} at {args.image_size}px, "
        f"{args.master}, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'pass':10s} {'seconds':>8s} {'through model':>14s} {'reused':>7s} {'share of full':>14s}")
    for name, (seconds, seen, outcome) in (("full", full), ("+10 %", grown), ("same", same)):
        print(f"{name:10s} {seconds:8.1f} {seen:14d} {outcome.reused_rows:7d} {seconds / full[0]:14.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
