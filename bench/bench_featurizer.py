#!/usr/bin/env python3
"""Benchmark the ImageFeaturizer against bare Keras and Spark's predict_batch_udf.

On a synthetic tree of chest-X-ray-sized JPEGs (cxr_pipeline.datasets.synthetic)
in the local HDFS, in one run and one Spark session (local[2] by default):

  (a) bare Keras   model.predict_on_batch, batch by batch, on already-decoded, resized
                   uint8 arrays (driver process)
  (b) featurizer   read_images(hdfs://...) -> ImageFeaturizer, end to end from HDFS bytes
  (c) spark-native a plain Pillow decode pandas UDF (full decode + resize to a float array)
                   -> pyspark.ml.functions.predict_batch_udf with the same Keras model
  (d) no Spark     the featurizer's own worker loop (spark._udf.WorkerFeaturizer: decode,
                   preprocess, predict) in one one-thread process per core, on JPEG bytes
                   already in memory: (b)/(d) is what Spark, HDFS and Arrow cost around the
                   loop, (d)/(a) what decoding and the per-core split cost

Each Spark variant is warmed up first (workers start, build and cache the model),
then timed over the whole tree with a no-op write; (a) and (b) run ``--repeats``
times, alternately, since other processes on shared cores shift speeds over
minutes. Prints images/s (with the load average at the time), (b)/(a) per pair,
their median and best-(b)/best-(a),
(b)/(c), (b)/(d), (d)/(a), the decode share of (b)'s worker time and peak RSS per Python worker.
Goal (issue 16): (b)/(a) >= 0.95 and (b) faster than (c). ``--prefetch`` turns on the decode-ahead
thread of (b) (off by default: one decode-then-predict loop per task) to measure what it brings.

    PYTHONPATH=lib .venv/bin/python bench/bench_featurizer.py [--n 1000] [--size 1500x1200]
        [--layer mixed5] [--batch-size 16] [--master local[2]]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import _bench_env  # noqa: F401 - lib/ importable, the local Spark environment
import numpy as np
import pandas as pd


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    parser.add_argument("--size", default="1500x1200", help="WIDTHxHEIGHT of the synthetic JPEGs")
    parser.add_argument("--model", default="InceptionV3")
    parser.add_argument("--layer", default=None, help="feature layer (default: the last)")
    parser.add_argument("--weights", default=None, help="weights file (default: the provisioned one, else 'random')")
    parser.add_argument("--batch-size", type=int, default=16, help="images per model call in every variant")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument(
        "--repeats", type=int, default=2, help="(a)/(b) pairs, run alternately back to back (default 2)"
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=None,
        help="repartition the read images to N before (b) and (c) (default: as binaryFile splits them)",
    )
    parser.add_argument(
        "--prefetch",
        action="store_true",
        help="(b) with the decode-ahead thread (ImageFeaturizer.prefetch = True; off by default)",
    )
    parser.add_argument(
        "--conf", action="append", default=[], help="extra Spark setting KEY=VALUE for (b) and (c) (repeatable)"
    )
    parser.add_argument("--local-dir", default=None, help="where the synthetic tree is generated (kept, resumable)")
    parser.add_argument(
        "--hdfs-dir", default=None, help="hdfs:// folder for the tree (default /bench/featurizer_<n>_<size>)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def prepare_tree(args) -> tuple[Path, str]:
    from cxr_pipeline import storage
    from cxr_pipeline.datasets import synthetic
    from cxr_pipeline.localstack.hdfs_cluster import ensure_running

    width, height = synthetic.parse_size(args.size)
    local = Path(args.local_dir or Path(tempfile.gettempdir()) / f"cxr_bench_featurizer_{args.n}_{args.size}")
    synthetic.generate(local, args.n, width, height)
    hdfs = ensure_running()
    remote = args.hdfs_dir or f"{hdfs.namenode_uri}/bench/featurizer_{args.n}_{args.size}"
    local_count = sum(1 for p in local.rglob("*.jpeg"))
    if (
        not storage.exists(remote)
        or sum(1 for f in storage.list_files(remote) if f.uri.endswith(".jpeg")) != local_count
    ):
        if storage.exists(remote):
            storage.delete(remote, recursive=True)
        started = time.perf_counter()
        storage.upload_dir(str(local), remote)
        print(f"uploaded {local_count} files to {remote} in {time.perf_counter() - started:.1f}s")
    return local, remote


def resolve_weights(args) -> str:
    if args.weights:
        return args.weights
    from cxr_pipeline.weights import WeightsNotFound, default_weights_path

    try:
        return str(default_weights_path(args.model))
    except (WeightsNotFound, ValueError):
        print("no provisioned weights: using random init (throughput does not depend on the values)")
        return "random"


def bench_bare_keras(args, files: list[Path], weights: str) -> float:
    """(a): decode everything first (not timed), then time the model alone, one batch per call.

    Batches go to ``predict_on_batch`` one by one (with the backbone's preprocessing, as in
    (b)): ``model.predict`` on one 1,000-image array spends most of its time feeding that
    array through tf.data on one core (measured: 11 images/s against 17-20 for n=400 here),
    which would measure Keras' array ingestion, not the model.
    """
    from cxr_pipeline.backbones import build_backbone, input_size, preprocess
    from cxr_pipeline.imaging import decode_image

    size = input_size(args.model)
    arrays = np.stack([decode_image(p.read_bytes(), size) for p in files])
    model = build_backbone(args.model, weights=weights, feature_layer=args.layer)
    batches = [arrays[i : i + args.batch_size] for i in range(0, len(arrays), args.batch_size)]
    for warm in {len(batch): batch for batch in batches}.values():  # trace each batch shape once
        model.predict_on_batch(preprocess(args.model, warm))
    started = time.perf_counter()
    for batch in batches:
        model.predict_on_batch(preprocess(args.model, batch))
    elapsed = time.perf_counter() - started
    return len(files) / elapsed


def featurizer_for(args, weights: str):
    """The ImageFeaturizer every featurizer variant here runs: ``--model``, ``--layer``, ``--batch-size``."""
    from cxr_pipeline.spark.featurizer import ImageFeaturizer

    return ImageFeaturizer(modelName=args.model, featureLayer=args.layer, weights=weights, batchSize=args.batch_size)


def _plain_process(settings, paths: list[str], barrier, results) -> None:
    """One core's share of (d): read its files, warm the model, wait for the others, time the loop."""
    from cxr_pipeline.spark._udf import WorkerFeaturizer

    contents = [Path(path).read_bytes() for path in paths]
    runner = WorkerFeaturizer(settings)
    runner.featurize_contents(pd.Series(contents[: settings.batch_size]))  # traces the batch shape
    chunks = [pd.Series(contents[i : i + 64]) for i in range(0, len(contents), 64)]  # Arrow-batch-sized
    barrier.wait(timeout=600)  # a sibling that failed to start breaks the barrier instead of hanging
    started = time.time()  # wall clock: comparable across the processes
    done = sum(int(frame["features"].notna().sum()) for frame in runner.featurize_stream(iter(chunks)))
    results.put((started, time.time(), done, runner.decode_seconds, runner.predict_seconds))


def bench_plain_processes(args, files: list[Path], weights: str, processes: int) -> tuple[float, float]:
    """(d): the featurizer's worker loop without Spark, ``processes`` one-thread processes side by side.

    Returns images/s over the wall time from the common start to the last process's end, and the
    decode share of the loop's time (decode / (decode + predict), summed over processes).
    """
    import dataclasses
    import multiprocessing

    settings = dataclasses.replace(featurizer_for(args, weights).worker_settings(), tf_threads=1)
    context = multiprocessing.get_context("spawn")  # the parent holds TensorFlow: never fork it
    barrier, results = context.Barrier(processes), context.Queue()
    shares = [[str(p) for p in files[i::processes]] for i in range(processes)]
    workers = [context.Process(target=_plain_process, args=(settings, share, barrier, results)) for share in shares]
    for worker in workers:
        worker.start()
    finished = [results.get(timeout=3600) for _ in workers]
    for worker in workers:
        worker.join()
    started, ended = min(r[0] for r in finished), max(r[1] for r in finished)
    images = sum(r[2] for r in finished)
    decode, predict = sum(r[3] for r in finished), sum(r[4] for r in finished)
    return images / (ended - started), decode / (decode + predict)


def _partitioned(images, partitions: int | None):
    return images.repartition(partitions) if partitions else images


def run_noop(df) -> float:
    started = time.perf_counter()
    df.write.format("noop").mode("overwrite").save()
    return time.perf_counter() - started


def bench_featurizer(spark, args, remote: str, weights: str) -> tuple[float, dict, float]:
    """(b): our reader + ImageFeaturizer from HDFS bytes."""
    from cxr_pipeline.spark.reader import read_images

    featurizer = featurizer_for(args, weights)
    if getattr(args, "prefetch", False):
        featurizer.prefetch = True  # not a Param: a benchmark switch only
    images = _partitioned(read_images(spark, remote), args.partitions)
    warm = run_noop(featurizer.transform(images.limit(2 * args.batch_size).repartition(2)))
    stats = featurizer.track_stats(spark)
    elapsed = run_noop(featurizer.transform(images))
    summary = stats.summary()
    return summary["images"] / elapsed, summary, warm


def bench_predict_batch_udf(spark, args, remote: str, weights: str) -> tuple[float, float]:
    """(c): a plain decode UDF + pyspark.ml.functions.predict_batch_udf."""
    import io

    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from cxr_pipeline.backbones import input_size

    height, width = input_size(args.model)
    model_name, layer = args.model, args.layer

    @F.pandas_udf(T.ArrayType(T.FloatType()))
    def decode(contents: pd.Series) -> pd.Series:
        from PIL import Image

        def one(data):
            image = Image.open(io.BytesIO(data)).convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.float32).reshape(-1)

        return pd.Series([one(d) for d in contents])

    def make_predict_fn():
        from cxr_pipeline.backbones import build_backbone, preprocess

        model = build_backbone(model_name, weights=weights, feature_layer=layer)

        def predict(inputs: np.ndarray) -> np.ndarray:
            return model.predict(preprocess(model_name, inputs), verbose=0)

        return predict

    featurize = predict_batch_udf(
        make_predict_fn,
        return_type=T.ArrayType(T.FloatType()),
        batch_size=args.batch_size,
        input_tensor_shapes=[[height, width, 3]],
    )
    from cxr_pipeline.spark.reader import read_images

    images = _partitioned(read_images(spark, remote), args.partitions)

    def plan(df):
        return df.withColumn("pixels", decode("content")).withColumn("features", featurize("pixels")).drop("pixels")

    warm = run_noop(plan(images.limit(2 * args.batch_size).repartition(2)))
    count = images.count()
    elapsed = run_noop(plan(images))
    return count / elapsed, warm


def report(label: str, images_per_s: float, note: str = "") -> None:
    load = os.getloadavg()[0]
    extra = f"  ({note})" if note else ""
    print(f"{label:<42}: {images_per_s:7.2f} images/s  [1-min load {load:.1f}]{extra}", flush=True)


def start_bench_spark(master: str, app_name: str, extra_conf: list[str] | None = None):
    """The Spark session (b) and (c) run in: reused Python workers, Arrow on and capped for images, no UI.

    ``extra_conf``: ``KEY=VALUE`` settings on top (a benchmark's repeatable ``--conf``).
    """
    from cxr_pipeline.spark.featurizer import configure_arrow_for_images
    from cxr_pipeline.spark.session import spark_session

    conf = {
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.python.worker.reuse": "true",
        "spark.driver.memory": "2g",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        **dict(item.split("=", 1) for item in extra_conf or []),
    }
    spark = spark_session({"spark": {"conf": conf, "log_level": "ERROR"}}, app_name=app_name, master=master)
    spark.sparkContext.setLogLevel("ERROR")
    configure_arrow_for_images(spark)
    return spark


def main(argv=None) -> int:
    args = parse_args(argv)
    local, remote = prepare_tree(args)
    files = sorted(local.rglob("*.jpeg"))
    weights = resolve_weights(args)
    mean_kb = sum(p.stat().st_size for p in files) / len(files) / 1e3
    print(f"tree: {len(files)} JPEGs of {args.size}, mean {mean_kb:.0f} kB, in {remote}")
    print(
        f"model: {args.model} layer={args.layer or 'last'} weights={Path(weights).name} batch={args.batch_size} "
        f"master={args.master} cores={os.cpu_count()}"
    )

    spark = start_bench_spark(args.master, "bench-featurizer", args.conf)
    partitions = (
        spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(remote).rdd.getNumPartitions()
    )
    cores = spark.sparkContext.defaultParallelism
    a_runs, b_runs = [], []
    try:
        # (a) and (b) alternate, back to back (a b, b a, a b, ...): other processes on the
        # same cores change the speed over minutes, so each ratio pairs neighbouring runs.
        for pair in range(args.repeats):
            order = ("a", "b") if pair % 2 == 0 else ("b", "a")
            for variant in order:
                if variant == "a":
                    a_runs.append(bench_bare_keras(args, files, weights))
                    report(f"(a) bare Keras predict on decoded arrays #{pair + 1}", a_runs[-1])
                else:
                    rate, run_stats, warm_b = bench_featurizer(spark, args, remote, weights)
                    b_runs.append(rate)
                    if pair == 0:
                        stats = run_stats  # decode share and memory: from the first featurizer run
                    report(
                        f"(b) featurizer, HDFS bytes end to end #{pair + 1}",
                        rate,
                        f"warm-up {warm_b:.1f}s" if pair == 0 else "",
                    )
            if pair == 0:
                c, warm_c = bench_predict_batch_udf(spark, args, remote, weights)
                report("(c) decode UDF + predict_batch_udf", c, f"warm-up {warm_c:.1f}s")
                d, decode_share_d = bench_plain_processes(args, files, weights, cores)
                report(f"(d) the worker loop in {cores} plain processes", d)
    finally:
        spark.stop()
    ratios = [b / a for a, b in zip(a_runs, b_runs)]
    print()
    print(f"images: {stats['images']} in {partitions} partitions")
    print(
        f"(b)/(a) per pair: {', '.join(f'{r:.3f}' for r in ratios)}; median {float(np.median(ratios)):.3f}; "
        f"best (b) / best (a) {max(b_runs) / max(a_runs):.3f}   goal >= 0.95"
    )
    print(f"(b)/(c) = {b_runs[0] / c:.3f} (first b), {float(np.median(b_runs)) / c:.3f} (median b)   goal > 1")
    print(
        f"(b)/(d) = {float(np.median(b_runs)) / d:.3f} (median b): Spark, HDFS and Arrow around the worker loop; "
        f"(d)/(a) = {d / float(np.median(a_runs)):.3f} (median a): decoding and the per-core split; "
        f"decode share of (d)'s loop {decode_share_d:.1%}"
    )
    print(
        f"decode share of (b) worker time: {stats['decode_share']:.1%} "
        f"(decode {stats['decode_seconds']:.1f}s, model {stats['predict_seconds']:.1f}s, "
        f"per-task set-up {stats['setup_seconds']:.1f}s, summed over tasks)"
    )
    print(
        f"model waiting for decoded images (b): {stats['wait_seconds']:.1f}s summed over tasks "
        f"(prefetch {'on' if args.prefetch else 'off'})"
    )
    print(f"peak RSS per Python worker (b): {stats['peak_worker_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
