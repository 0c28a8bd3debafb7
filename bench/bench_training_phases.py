#!/usr/bin/env python3
"""The whole training job against the featurizer alone, and where its time goes (issue 16, goal 2).

On the tree of ``bench/bench_featurizer.py`` (synthetic chest-X-ray-sized JPEGs in the local HDFS), in one
process and one Spark session:

  (b)   the featurizer alone, end to end from HDFS bytes (a no-op write), after a warm-up
  job   ``spark.classifier.training.train()`` (what ``jobs/train_featurizer.py`` runs) with a fresh
        feature cache: listing, featurizing + cache write, cache read, fitting, evaluation, writing

Prints the job's featurizing throughput against (b) (goal >= 0.9) and the share of each phase
(``metrics.json`` ``timing``). Then the BLAS question: the logistic-regression fit alone, on the
run's cached features, in two fresh processes: with Spark's Java BLAS fallback, and with Debian's
OpenBLAS (``--openblas DIR``: a folder holding libblas.so.3, e.g. the libopenblas0-pthread package
unpacked with ``apt-get download`` + ``dpkg -x``; nothing is installed system-wide).

    PYTHONPATH=lib nice -n 5 .venv/bin/python bench/bench_training_phases.py [--n 1000] [--size 1500x1200]
        [--openblas /tmp/openblas/usr/lib/x86_64-linux-gnu/openblas-pthread] [--stages]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _bench_env  # noqa: F401 - lib/ importable, the local Spark environment
import _spark_jobs


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    parser.add_argument("--size", default="1500x1200", help="WIDTHxHEIGHT of the synthetic JPEGs")
    parser.add_argument("--layer", default="mixed5", help="feature layer (default: the jobs' mixed5)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--openblas", default=None, help="folder with an OpenBLAS libblas.so.3 for the fit comparison")
    parser.add_argument("--fit-repeats", type=int, default=3, help="LR fits per BLAS variant (default 3)")
    parser.add_argument(
        "--stages",
        action="store_true",
        help="also list Spark's stages of (b) and of the job (wall, tasks, executor run/CPU time, from an event log)",
    )
    parser.add_argument("--fit-only", default=None, help=argparse.SUPPRESS)  # child process: features URI
    parser.add_argument("--local-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hdfs-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="InceptionV3", help=argparse.SUPPRESS)
    parser.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--partitions", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def config_for(args) -> dict:
    from cxr_pipeline.config import load_config

    return load_config(
        "local",
        overrides=[
            f"featurizer.feature_layer={args.layer}",
            f"featurizer.batch_size={args.batch_size}",
            "tracking.enabled=false",
            f"spark.master={args.master}",
        ],
    )


def main_run(args) -> int:
    import bench_featurizer as bf

    _, remote = bf.prepare_tree(args)
    config = config_for(args)
    event_log = Path(tempfile.mkdtemp(prefix="cxr_bench_events_")) if args.stages else None
    out = Path(tempfile.mkdtemp(prefix="cxr_bench_phases_"))
    try:
        return measure(args, config, remote, out, event_log)
    finally:  # the run folder and the event log are this benchmark's own, kept only while it runs
        shutil.rmtree(out, ignore_errors=True)
        if event_log:
            shutil.rmtree(event_log, ignore_errors=True)


def measure(args, config: dict, remote: str, out: Path, event_log: Path | None) -> int:
    import bench_featurizer as bf

    from cxr_pipeline.spark.classifier import training
    from cxr_pipeline.spark.session import spark_session

    if event_log:  # spark_session() builds from the config alone; the launcher's arguments reach the JVM too
        settings = " ".join(f"--conf {k}={v}" for k, v in _spark_jobs.event_log_conf(event_log).items())
        os.environ["PYSPARK_SUBMIT_ARGS"] = f"{settings} pyspark-shell"
    spark = spark_session(config, app_name="bench-training-phases", master=args.master)
    spark.sparkContext.setLogLevel("ERROR")
    try:
        weights = bf.resolve_weights(args)  # bench_featurizer reads args.model/layer/weights/batch_size/partitions
        b_began_ms = int(time.time() * 1000)
        rate_b, _, warm = bf.bench_featurizer(spark, args, remote, weights)
        print(f"(b) featurizer alone     : {rate_b:7.2f} images/s  (warm-up {warm:.1f}s) [{load()}]", flush=True)
        job_began_ms = int(time.time() * 1000)
        began = time.perf_counter()
        result = training.train(spark, config, remote, f"file://{out}/run")
        wall = time.perf_counter() - began
    finally:
        spark.stop()
    timing = result.metrics["timing"]
    rate_job = timing.get("featurize_images_per_s", 0.0)
    print(f"job featurizing phase    : {rate_job:7.2f} images/s  [{load()}]")
    print(f"job / (b) = {rate_job / rate_b:.3f}   goal >= 0.9")
    print(f"\ntrain() {wall:.1f}s wall, phases {timing['total_seconds']:.1f}s:")
    for phase, seconds in timing["seconds"].items():
        print(f"  {phase:<12} {seconds:7.1f}s  {timing['shares'][phase]:6.1%}")
    if event_log:
        found = _spark_jobs.stages(event_log)
        print("\nSpark stages of (b), warm-up first:")
        _spark_jobs.print_stages(found, b_began_ms, job_began_ms)
        print("\nSpark stages of the job:")
        _spark_jobs.print_stages(found, job_began_ms)
    snapshot = result.metrics["featurizer"]["cache"]["snapshot"]
    if args.openblas:
        fits = {
            name: fit_in_child(args, snapshot, blas)
            for name, blas in (("Java (F2j/VectorBLAS)", None), ("OpenBLAS", args.openblas))
        }
        print()
        for name, (seconds, impl) in fits.items():
            print(f"LR fit, {name:<22}: median {seconds:.2f}s over {args.fit_repeats}  ({impl}) [{load()}]")
        print(f"fit share of train(): {timing['seconds']['fitting'] / timing['total_seconds']:.1%}")
    return 0


def fit_in_child(args, features_uri: str, blas_dir: str | None) -> tuple[float, str]:
    env = dict(os.environ)
    command = [
        sys.executable,
        __file__,
        "--fit-only",
        features_uri,
        "--fit-repeats",
        str(args.fit_repeats),
        "--master",
        args.master,
    ]
    if blas_dir:
        gfortran = str(Path(blas_dir).parent)  # libgfortran.so.5 one level up in the unpacked packages
        env["LD_LIBRARY_PATH"] = f"{blas_dir}:{gfortran}:{env.get('LD_LIBRARY_PATH', '')}"
        env["CXR_BENCH_BLAS"] = str(Path(blas_dir) / "libblas.so.3")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    line = next((line for line in done.stdout.splitlines() if line.startswith("FIT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"fit child failed: {done.stderr[-2000:]}")
    result = json.loads(line[4:])
    return result["median_s"], result["blas"]


def fit_only(args) -> int:
    """Child: StandardScaler + LogisticRegression on cached features, as train() fits them."""
    import statistics

    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    from cxr_pipeline.spark.classifier import training

    builder = (
        SparkSession.builder.master(args.master)
        .appName("bench-lr-fit")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.memory", "2g")
    )
    if os.environ.get("CXR_BENCH_BLAS"):
        builder = builder.config(
            "spark.driver.extraJavaOptions", f"-Ddev.ludovic.netlib.blas.nativeLibPath={os.environ['CXR_BENCH_BLAS']}"
        )
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    jvm = spark.sparkContext._jvm
    blas = jvm.dev.ludovic.netlib.blas.BLAS.getInstance().getClass().getName()
    settings = training.TrainingSettings.from_config(config_for(args))
    data = (
        spark.read.parquet(args.fit_only)
        .where(F.col("features").isNotNull())
        .withColumn("label", F.when(F.col("path").contains("/PNEUMONIA/"), 1).otherwise(0))
        .withColumn(training.WEIGHT_COL, F.lit(1.0))
        .cache()
    )
    data.count()
    seconds = []
    for _ in range(args.fit_repeats):
        began = time.perf_counter()
        training.fit_classifier(data, settings, weighted=True)
        seconds.append(time.perf_counter() - began)
    spark.stop()
    print("FIT " + json.dumps({"median_s": statistics.median(seconds), "blas": blas, "all": seconds}))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return fit_only(args) if args.fit_only else main_run(args)


if __name__ == "__main__":
    sys.exit(main())
