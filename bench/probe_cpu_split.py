#!/usr/bin/env python3
"""Where the featurizer's core-seconds go, by process and by thread (issue 16, goal 1).

Runs (b) of ``bench_featurizer.py`` (read_images from HDFS -> ImageFeaturizer -> noop write) once
to warm up and once measured, and adds up the CPU time (``/proc/<pid>/task/<tid>/stat``, user +
system) of every process taking part over the measured pass: the driver JVM (the executor, in local
mode), the Python workers, the HDFS daemons and this driver process. JVM and worker threads are
grouped by name (digits dropped), so JIT, GC, task and Arrow-writer threads are told apart.

    PYTHONPATH=lib .venv/bin/python bench/probe_cpu_split.py [--n 1000] [--size 1500x1200] [--top 12]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

import _bench_env  # noqa: F401 - lib/ importable, the local Spark environment
import bench_featurizer as bench

from cxr_pipeline.infra.localstack.processes import command_line

TICK = os.sysconf("SC_CLK_TCK")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    parser.add_argument("--size", default="1500x1200", help="WIDTHxHEIGHT of the synthetic JPEGs")
    parser.add_argument("--layer", default=None, help="feature layer (default: the last)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--top", type=int, default=12, help="thread groups listed per process kind")
    parser.add_argument("--conf", action="append", default=[], help="extra Spark setting KEY=VALUE (repeatable)")
    args = parser.parse_args(argv)
    args.model, args.weights, args.partitions, args.prefetch = "InceptionV3", None, None, False
    args.local_dir = args.hdfs_dir = None
    return args


def _kind(pid: str, cmdline: str) -> str | None:
    if int(pid) == os.getpid():
        return "driver python"
    if "pyspark.daemon" in cmdline or "pyspark.worker" in cmdline:
        return "python workers"
    if "org.apache.spark.deploy.SparkSubmit" in cmdline:
        return "driver JVM (executor)"
    if "namenode.NameNode" in cmdline or "datanode.DataNode" in cmdline:
        return "HDFS daemons"
    return None


def thread_seconds() -> Counter:
    """(process kind, thread name) -> CPU seconds so far, for every thread of the processes above."""
    totals: Counter = Counter()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        kind = _kind(pid, command_line(pid) or "")
        if kind is None:
            continue
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            seconds = (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
            totals[(kind, re.sub(r"\d+", "#", name))] += seconds
    return totals


def main(argv=None) -> int:
    args = parse_args(argv)
    _, remote = bench.prepare_tree(args)
    weights = bench.resolve_weights(args)

    spark = bench.start_bench_spark(args.master, "probe-cpu-split", args.conf)
    from cxr_pipeline.spark.reader import read_images

    try:
        warm_rate, _, _ = bench.bench_featurizer(spark, args, remote, weights)  # workers up, model built
        featurizer = bench.featurizer_for(args, weights)
        stats = featurizer.track_stats(spark)
        print("measured pass starts", flush=True)
        before, began = thread_seconds(), time.perf_counter()
        bench.run_noop(featurizer.transform(read_images(spark, remote)))
        wall, after = time.perf_counter() - began, thread_seconds()
        summary = stats.summary()
        rate = summary["images"] / wall
    finally:
        spark.stop()
    used = after - before
    by_kind: Counter = Counter()
    for (kind, _), seconds in used.items():
        by_kind[kind] += seconds
    total = sum(by_kind.values())
    print(f"\n(b) warm-up pass {warm_rate:.2f} images/s; measured pass {rate:.2f} images/s, {wall:.1f} s wall")
    print(f"CPU over the measured pass: {total:.1f} core-s = {total / wall:.2f} cores busy on average")
    print(
        f"featurizer's own clocks (summed over tasks): model {summary['predict_seconds']:.1f} s, "
        f"decode {summary['decode_seconds']:.1f} s, per-task set-up {summary['setup_seconds']:.1f} s"
    )
    for kind, seconds in by_kind.most_common():
        print(f"\n{kind}: {seconds:.1f} core-s ({seconds / total:.1%})")
        threads = Counter({name: s for (k, name), s in used.items() if k == kind and s > 0})
        for name, s in threads.most_common(args.top):
            print(f"    {name:<28} {s:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
