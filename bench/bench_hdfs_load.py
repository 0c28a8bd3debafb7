#!/usr/bin/env python3
"""Benchmark `make hdfs-load` against a single plain `hdfs dfs -put -f` of the same tree.

Makes a synthetic chest_xray tree of small JPEGs (cxr_pipeline.datasets.synthetic),
then, in one run and against the same HDFS, times end to end (process start to exit):

  plain    scripts/hdfs dfs -put -f SRC DEST          (one JVM, files one after another)
  cli      scripts/hdfs_load.py SRC DEST --via cli     (scan+MD5, staged batches, mark, rename, manifest, verify)
  webhdfs  scripts/hdfs_load.py SRC DEST --via webhdfs
  web-size scripts/hdfs_load.py SRC DEST --via webhdfs --verify size (a fresh target: what content checks cost)
  rerun    scripts/hdfs_load.py SRC DEST --verify size (the cli target again, else the webhdfs one: nothing to
           upload, sizes compared)
  crc      scripts/hdfs_load.py SRC DEST --verify crc (that target again: HDFS's file checksum of every file,
           against the same computed locally)
  checksum scripts/hdfs_load.py SRC DEST --verify checksum (that target again: every file re-read, MD5)

The first loads verify by hdfs_load.verify (conf/defaults.yaml). Prints files/s, MB/s, the ratio
ours/plain (> 1: ours is faster), and what crc and checksum cost against sizes only.

    PYTHONPATH=lib .venv/bin/python bench/bench_hdfs_load.py [--n 2000] [--size 256x256] [--workers 8]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from cxr_pipeline.infra import storage  # noqa: E402
from cxr_pipeline.infra.localstack.hdfs_cluster import ensure_running  # noqa: E402


def make_tree(out: Path, n: int, size: str) -> Path:
    if not (out / "train").is_dir():
        subprocess.run(
            [sys.executable, "-m", "cxr_pipeline.datasets.synthetic", "--out", str(out), "--n", str(n), "--size", size],
            check=True,
            cwd=REPO,
            env={"PYTHONPATH": str(REPO / "lib"), "PATH": "/usr/bin:/bin"},
        )
    return out


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
        )
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="number of JPEGs (default %(default)s)")
    parser.add_argument("--size", default="256x256", help="image size WxH (default %(default)s)")
    parser.add_argument("--workers", type=int, default=8, help="hdfs_load --workers (default %(default)s)")
    parser.add_argument("--tree", type=Path, help="reuse/keep the synthetic tree here (default: a temp dir)")
    parser.add_argument(
        "--modes",
        default="plain,cli,webhdfs,web-size,rerun,crc,checksum",
        help="comma list (default %(default)s; rerun, crc and checksum need cli or webhdfs first)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the HDFS copies")
    args = parser.parse_args()

    hdfs = ensure_running()
    base = f"{hdfs.namenode_uri}/bench/hdfs_load/{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="bench_hdfs_load_") as tmp:
        tree = make_tree(args.tree or Path(tmp) / "chest_xray", args.n, args.size)
        files = [p for p in tree.rglob("*") if p.is_file()]
        images = [p for p in files if p.suffix == ".jpeg"]
        n_bytes = sum(p.stat().st_size for p in images)
        print(
            f"tree: {tree}: {len(images)} JPEGs, {n_bytes / 1e6:.2f} MB (mean {n_bytes / len(images) / 1e3:.1f} kB),"
            f" {len(files) - len(images)} other file(s); workers={args.workers}; HDFS {hdfs.namenode_uri}"
        )
        loader = [sys.executable, str(REPO / "scripts" / "hdfs_load.py"), str(tree)]
        modes = args.modes.split(",")
        again = f"{base}/cli" if "cli" in modes else f"{base}/webhdfs"  # what rerun, crc and checksum load again
        commands = {
            "plain": [str(REPO / "scripts" / "hdfs"), "dfs", "-put", "-f", str(tree), f"{base}/plain"],
            "cli": [*loader, f"{base}/cli", "--via", "cli", "--workers", str(args.workers), "--no-progress"],
            "webhdfs": [
                *loader,
                f"{base}/webhdfs",
                "--via",
                "webhdfs",
                "--workers",
                str(args.workers),
                "--no-progress",
            ],
            "web-size": [
                *loader,
                f"{base}/webhdfs-size",
                "--via",
                "webhdfs",
                "--verify",
                "size",
                "--workers",
                str(args.workers),
                "--no-progress",
            ],
            **{
                mode: [*loader, again, "--verify", verify, "--workers", str(args.workers), "--no-progress"]
                for mode, verify in (("rerun", "size"), ("crc", "crc"), ("checksum", "checksum"))
            },
        }
        storage.makedirs(base)
        results = {}
        try:
            for mode in modes:
                seconds = timed(commands[mode])
                results[mode] = seconds
                print(f"  {mode:<8} {seconds:8.1f} s", flush=True)
        finally:
            if not args.keep:
                storage.delete(base, recursive=True)
    print(f"\n{'mode':<8} {'seconds':>8} {'files/s':>8} {'MB/s':>7} {'ours/plain':>10}")
    for mode, seconds in results.items():
        ratio = f"{results['plain'] / seconds:10.2f}" if "plain" in results and mode != "plain" else f"{'':>10}"
        print(f"{mode:<8} {seconds:8.1f} {len(images) / seconds:8.1f} {n_bytes / 1e6 / seconds:7.2f} {ratio}")
    print("(ours/plain = plain seconds / our seconds, i.e. throughput ratio; rerun, crc and checksum upload nothing)")
    for mode in ("crc", "checksum"):
        if "rerun" in results and mode in results:
            extra = results[mode] - results["rerun"]
            print(
                f"--verify {mode} re-run / size re-run: {results[mode] / results['rerun']:.2f}x the time "
                f"(+{extra:.1f} s, {extra / len(images) * 1e3:.1f} ms per file)"
            )
    if "webhdfs" in results and "web-size" in results:
        print(f"webhdfs load verified as configured / --verify size: {results['webhdfs'] / results['web-size']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
