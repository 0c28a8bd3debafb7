#!/usr/bin/env python3
"""Spark writing small files to HDFS: how long closing them waits, with the project's client setting and without.

Closing an HDFS file waits until the NameNode has heard of its last block from the DataNode. Hadoop's
client asks again after ``dfs.client.block.write.locateFollowingBlock.initial.delay.ms`` (400 ms by
default, doubling), so a small file often takes 0.4 s to close for nothing. ``conf/defaults.yaml`` sets
25 ms (and 9 retries, the same 12.8 s of patience). This benchmark runs the same writes in two fresh Spark
sessions, one per setting (the HDFS client reads it once per JVM), on the local HDFS:

  33 files   one Parquet file per task, as a stage of 33 tasks writes them (e.g. 1,000 X-rays' binaryFile splits)
  2 files    the feature cache's snapshot (defaultParallelism files after a shuffle)

and prints the median of ``--repeats`` writes (after one warm-up) and the ratio. Writes through WebHDFS
(``cxr_pipeline.infra.storage``) close their files in the DataNode's own client, which the local Hadoop 2.7.3
does not let anyone configure (its 400 ms is fixed; the setting came in 2.8): they still wait.

    PYTHONPATH=lib .venv/bin/python bench/bench_hdfs_writes.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import _bench_env  # noqa: F401 - lib/ importable, the local Spark environment

DELAY_KEY = "spark.hadoop.dfs.client.block.write.locateFollowingBlock.initial.delay.ms"
RETRIES_KEY = "spark.hadoop.dfs.client.block.write.locateFollowingBlock.retries"
HADOOP_DEFAULTS = {DELAY_KEY: "400", RETRIES_KEY: "5"}
SHAPES = {"33 files": 33, "2 files": 2}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed writes per shape and setting (default 5)")
    parser.add_argument("--rows", type=int, default=990, help="rows written each time (768 floats each)")
    parser.add_argument("--child", choices=("project", "hadoop"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child(args) -> dict[str, list[float]]:
    """Times the writes in this process's Spark session: the project's settings, or Hadoop's defaults."""
    from pyspark.sql import functions as F

    from cxr_pipeline.config import load_config
    from cxr_pipeline.infra.localstack.hdfs_cluster import ensure_running
    from cxr_pipeline.spark.session import spark_session

    config = load_config()
    if args.child == "hadoop":
        config["spark"]["conf"].update(HADOOP_DEFAULTS)
    namenode = ensure_running().namenode_uri
    spark = spark_session(config, app_name="bench-hdfs-writes", master="local[2]")
    spark.sparkContext.setLogLevel("ERROR")
    rows = spark.range(0, args.rows, 1, SHAPES["33 files"]).select(
        F.col("id").cast("string").alias("path"), F.array_repeat(F.rand(), 768).alias("features")
    )
    times: dict[str, list[float]] = {shape: [] for shape in SHAPES}
    for attempt in range(args.repeats + 1):  # the first is a warm-up: the JVM's first Parquet writes
        for shape, files in SHAPES.items():
            frame = rows if files == SHAPES["33 files"] else rows.repartition(files, "path")
            started = time.perf_counter()
            frame.write.mode("overwrite").parquet(f"{namenode}/tmp/bench_hdfs_writes/{args.child}_{files}")
            if attempt:
                times[shape].append(time.perf_counter() - started)
    spark.stop()
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    from cxr_pipeline.config import load_config

    project = {k: load_config()["spark"]["conf"].get(k) for k in HADOOP_DEFAULTS}
    results = {}
    for setting in ("project", "hadoop"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", setting, "--repeats", str(args.repeats), "--rows", str(args.rows)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results[setting] = json.loads(out.strip().splitlines()[-1])
    print(f"project setting {project}, Hadoop's default {HADOOP_DEFAULTS}; median of {args.repeats} writes:")
    for shape in SHAPES:
        ours, theirs = (statistics.median(results[s][shape]) for s in ("project", "hadoop"))
        spread = ", ".join(f"{s}: " + " / ".join(f"{t:.2f}" for t in results[s][shape]) for s in results)
        print(f"  {shape:<9} project {ours:5.2f} s   Hadoop default {theirs:5.2f} s   {theirs / ours:4.1f}x")
        print(f"            ({spread})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
