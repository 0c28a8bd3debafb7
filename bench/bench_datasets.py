"""Benchmark the development data generators: images/s, 1 worker vs N, and JPEG sizes.

    PYTHONPATH=lib .venv/bin/python bench/bench_datasets.py [--n 40] [--size 1500x1200] [--npz FILE]

1. the synthetic generator at ``--size`` with 1 worker, then ``--workers``;
2. with ``--npz``: the MedMNIST converter (upscale to 299) with 1 worker, then ``--workers``.

Each run writes into a fresh temporary folder. Figures are printed, not
asserted; on a shared machine compare them only within one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cxr_pipeline.datasets import medmnist, synthetic, tree_writer


def _timed(run) -> tuple[float, list[int]]:
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        run(Path(scratch))
        elapsed = time.perf_counter() - started
        sizes = [p.stat().st_size for p in Path(scratch).rglob("*.jpeg")]
    return elapsed, sizes


def _report(label: str, elapsed: float, sizes: list[int], baseline: float | None = None) -> float:
    rate = len(sizes) / elapsed
    speedup = f", x{rate / baseline:.2f} vs 1 worker" if baseline else ""
    print(
        f"{label}: {len(sizes)} images in {elapsed:.1f} s = {rate:.1f} images/s{speedup}; "
        f"JPEG median {statistics.median(sizes) / 1e3:.0f} kB (min {min(sizes) / 1e3:.0f}, max {max(sizes) / 1e3:.0f})"
    )
    return rate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=40, help="synthetic images per run (default: %(default)s)")
    parser.add_argument("--size", default="1500x1200", help="synthetic WIDTHxHEIGHT (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=tree_writer.default_workers(), help="default: %(default)s")
    parser.add_argument("--npz", type=Path, help="a MedMNIST npz to time the converter on")
    parser.add_argument("--limit", type=int, default=400, help="npz images per split (default: %(default)s)")
    args = parser.parse_args(argv)
    width, height = synthetic.parse_size(args.size)

    for what, run in [
        (f"synthetic {args.size}", lambda w: lambda out: synthetic.generate(out, args.n, width, height, workers=w)),
        *(
            [
                (
                    "medmnist -> 299 px",
                    lambda w: lambda out: medmnist.convert(args.npz, out, 299, ["train", "val"], args.limit, workers=w),
                )
            ]
            if args.npz
            else []
        ),
    ]:
        baseline = _report(f"{what}, 1 worker", *_timed(run(1)))
        if args.workers > 1:
            _report(f"{what}, {args.workers} workers", *_timed(run(args.workers)), baseline=baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
