"""Storage figures against the real local HDFS: per-file write/read latency and
upload_dir/download_dir of the sample tree, one worker vs several (measured in one run).

    PYTHONPATH=lib .venv/bin/python bench/bench_storage.py [--tree data/sample/chest_xray] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from cxr_pipeline import paths
from cxr_pipeline.infra import storage
from cxr_pipeline.infra.localstack.hdfs_cluster import ensure_running


def timed(func, *args, **kwargs) -> float:
    started = time.perf_counter()
    func(*args, **kwargs)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tree", type=Path, default=paths.SAMPLE_TREE, help="local folder to upload (default: %(default)s)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions per figure (median reported)")
    parser.add_argument("--workers", type=int, default=8, help="parallel workers for the *_dir calls")
    args = parser.parse_args(argv)
    if not args.tree.is_dir():
        print(f"no folder {args.tree}: run `make sample-data` or pass --tree", file=sys.stderr)
        return 1

    hdfs = ensure_running()
    base = f"{hdfs.namenode_uri}/bench/storage-{uuid.uuid4().hex[:8]}"
    files = sorted(p for p in args.tree.rglob("*") if p.is_file())
    total_mb = sum(p.stat().st_size for p in files) / 1e6
    print(f"tree: {len(files)} files, {total_mb:.2f} MB; HDFS {hdfs.namenode_uri}")
    try:
        small = b"x" * 1000
        writes = [timed(storage.write_bytes, f"{base}/small-{i}", small) for i in range(args.repeat * 3)]
        reads = [timed(storage.read_bytes, f"{base}/small-{i}") for i in range(args.repeat * 3)]
        print(
            f"write_bytes 1 kB: median {statistics.median(writes) * 1000:.0f} ms   "
            f"read_bytes 1 kB: median {statistics.median(reads) * 1000:.0f} ms"
        )

        figures = {}
        for workers in (1, args.workers):
            up = [
                timed(storage.upload_dir, args.tree, f"{base}/up-{workers}-{r}", workers=workers)
                for r in range(args.repeat)
            ]
            with tempfile.TemporaryDirectory() as tmp:
                down = [
                    timed(storage.download_dir, f"{base}/up-{workers}-0", f"{tmp}/{r}", workers=workers)
                    for r in range(args.repeat)
                ]
            figures[workers] = (statistics.median(up), statistics.median(down))
            print(
                f"workers={workers}: "
                f"upload_dir {figures[workers][0]:.2f} s ({len(files) / figures[workers][0]:.1f} files/s), "
                f"download_dir {figures[workers][1]:.2f} s ({len(files) / figures[workers][1]:.1f} files/s)"
            )
        one, many = figures[1], figures[args.workers]
        print(f"speed-up with {args.workers} workers: upload x{one[0] / many[0]:.1f}, download x{one[1] / many[1]:.1f}")
    finally:
        storage.delete(base, recursive=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
