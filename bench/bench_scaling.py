#!/usr/bin/env python3
"""Scaling of featurization (issue 16, goal 3): in images, and in standalone workers.

1. **Images** (``--sizes 5000,20000``): the whole ``train()`` of ``jobs/train_featurizer.py`` (listing,
   path parsing, the patient split, the broadcast join, featurizing into a fresh feature cache, fitting,
   evaluation) on synthetic PneumoniaMNIST-size JPEGs (``--pixels 28``), the backbone run at
   ``--image-size`` (small, to keep it affordable). Prints each run's per-phase seconds and the ratio of
   the largest to the smallest run for the total and each phase, against the ratio of images.
   Goal: 4x the images <= 4.2x the time.
2. **Workers** (``--workers-n 4000``): a private standalone cluster of two one-core workers (free ports,
   its own state folder; the shared cluster on 7077 is left alone), the same featurization as one app
   with ``spark.cores.max=1`` (one executor) and as one with 2 (two executors), each after a warm-up.
   Prints images/s and the speed-up. Goal: 2 workers >= 1.8x 1 worker.

The machine is shared: every figure is printed with the 1-minute load average at the time, and figures
taken under load are indicative only. Ratios compare runs made minutes apart in one process.

    PYTHONPATH=lib nice -n 5 .venv/bin/python bench/bench_scaling.py [--sizes 5000,20000]
        [--image-size 75] [--pixels 28] [--workers-n 4000] [--skip-images | --skip-workers]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _bench_env import REPO  # lib/ importable, the local Spark environment


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", default="5000,20000", help="image counts of the whole-job runs (default %(default)s)"
    )
    parser.add_argument("--pixels", type=int, default=28, help="side of the synthetic JPEGs (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=75, help="backbone input side (InceptionV3 >= 75)")
    parser.add_argument("--layer", default="mixed5", help="feature layer (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="featurizer.batch_size (default %(default)s)")
    parser.add_argument("--master", default="local[2]", help="master of the whole-job runs (default %(default)s)")
    parser.add_argument("--workers-n", type=int, default=4000, help="images of the 1- vs 2-worker runs")
    parser.add_argument("--skip-images", action="store_true", help="only the workers part")
    parser.add_argument("--skip-workers", action="store_true", help="only the images part")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "cxr_bench_scaling",
        help="where the synthetic trees are generated (kept, resumable)",
    )
    return parser.parse_args(argv)


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def tree(args, n: int) -> Path:
    from cxr_pipeline.datasets import synthetic

    root = args.data_dir / f"n{n}_{args.pixels}px" / "chest_xray"
    synthetic.generate(root, n, args.pixels, args.pixels)
    return root


def config_for(args) -> dict:
    from cxr_pipeline.config import load_config

    return load_config(
        "local",
        overrides=[
            f"featurizer.image_size={args.image_size}",
            f"featurizer.feature_layer={args.layer}",
            f"featurizer.batch_size={args.batch_size}",
            "tracking.enabled=false",
            f"spark.master={args.master}",
        ],
    )


def whole_job(args) -> None:
    from cxr_pipeline.spark.classifier import training
    from cxr_pipeline.spark.session import spark_session

    sizes = [int(s) for s in args.sizes.split(",")]
    config = config_for(args)
    spark = spark_session(config, app_name="bench-scaling", master=args.master)
    spark.sparkContext.setLogLevel("ERROR")
    out_root = args.data_dir / "runs"
    shutil.rmtree(out_root, ignore_errors=True)
    timings = {}
    try:
        # warm-up: workers start and build the model once (not timed)
        warm = tree(args, 200)
        training.train(spark, config, f"file://{warm}", f"file://{out_root}/warm")
        for n in sizes:
            root = tree(args, n)
            began = time.perf_counter()
            result = training.train(spark, config, f"file://{root}", f"file://{out_root}/n{n}")
            wall = time.perf_counter() - began
            timing = result.metrics["timing"]
            timings[n] = (wall, timing)
            phases = ", ".join(f"{k} {v:.1f}s" for k, v in timing["seconds"].items())
            print(
                f"n={n:>6}: train() {wall:7.1f}s  featurize {timing.get('featurize_images_per_s', 0):.0f} images/s  "
                f"[{load()}]  ({phases})",
                flush=True,
            )
    finally:
        spark.stop()
    small, large = min(timings), max(timings)
    if small == large:
        return
    factor = large / small
    (wall_s, t_s), (wall_l, t_l) = timings[small], timings[large]
    print(
        f"\n{large}/{small} = {factor:.1f}x the images: train() {wall_l / wall_s:.2f}x the time"
        f"   goal <= {factor * 1.05:.2f}x"
    )
    for phase in t_l["seconds"]:
        a, b = t_s["seconds"].get(phase, 0.0), t_l["seconds"][phase]
        print(f"  {phase:<12} {a:7.1f}s -> {b:7.1f}s  {b / a if a else float('nan'):5.2f}x")


def featurize_rate(spark, args, data_uri: str) -> tuple[float, float]:
    from cxr_pipeline.spark.featurizer import ImageFeaturizer
    from cxr_pipeline.spark.reader import read_images

    featurizer = ImageFeaturizer(featureLayer=args.layer, imageSize=args.image_size, batchSize=args.batch_size)
    images = read_images(spark, data_uri)
    began = time.perf_counter()
    featurizer.transform(images.limit(4 * args.batch_size).repartition(4)).write.format("noop").mode("overwrite").save()
    warm = time.perf_counter() - began
    stats = featurizer.track_stats(spark)
    began = time.perf_counter()
    featurizer.transform(images).write.format("noop").mode("overwrite").save()
    return stats.images.value / (time.perf_counter() - began), warm


def workers(args) -> None:
    from pyspark.sql import SparkSession

    from cxr_pipeline.infra.localstack.faults import _free_port_run
    from cxr_pipeline.infra.localstack.processes import free_port
    from cxr_pipeline.infra.localstack.spark_cluster import LocalSparkStandalone

    root = tree(args, args.workers_n)
    state = Path(tempfile.mkdtemp(prefix="cxr_bench_scaling_spark_"))
    cluster = LocalSparkStandalone(
        master_port=free_port(), web_port=_free_port_run(3), workers=2, cores=1, memory="1536m", state_dir=state
    )
    cluster.up(timeout=180)
    rates = {}
    try:
        for cores in (1, 2):
            spark = (
                SparkSession.builder.master(cluster.master_url)
                .appName(f"bench-scaling-{cores}-workers")
                .config("spark.ui.enabled", "false")
                .config("spark.ui.showConsoleProgress", "false")  # the figures, not Spark's stage bars
                .config("spark.executor.cores", "1")
                .config("spark.cores.max", str(cores))
                .config("spark.executor.memory", "1g")
                .config("spark.python.worker.reuse", "true")
                .config("spark.executorEnv.PYTHONPATH", str(REPO / "lib"))
                .config("spark.scheduler.minRegisteredResourcesRatio", "1.0")
                .config("spark.scheduler.maxRegisteredResourcesWaitingTime", "120s")
                .getOrCreate()
            )
            spark.sparkContext.setLogLevel("ERROR")
            try:
                rate, warm = featurize_rate(spark, args, f"file://{root}")
            finally:
                spark.stop()
            rates[cores] = rate
            print(
                f"{cores} worker(s), {args.workers_n} images: {rate:7.1f} images/s  (warm-up {warm:.1f}s) [{load()}]",
                flush=True,
            )
    finally:
        cluster.down()
        shutil.rmtree(state, ignore_errors=True)
    print(f"\n2 workers / 1 worker = {rates[2] / rates[1]:.2f}x   goal >= 1.8x   (machine: {os.cpu_count()} cores)")


def main(argv=None) -> int:
    args = parse_args(argv)
    print(
        f"synthetic {args.pixels}x{args.pixels} JPEGs, InceptionV3 {args.layer} at {args.image_size}px, "
        f"batch {args.batch_size}, {os.cpu_count()} cores [{load()}]"
    )
    if not args.skip_images:
        whole_job(args)
    if not args.skip_workers:
        workers(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
