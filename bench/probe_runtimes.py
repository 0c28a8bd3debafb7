#!/usr/bin/env python3
"""The featurizer's backbone alone on each runtime, interleaved: which runtime is faster on this CPU.

One process; each runtime built as a Spark worker builds it (``--threads`` intra-op threads, 1 = one
task per core), fed the same preprocessed batch of ``--batch-size`` real X-rays (data/sample) in
rounds: every round times ``--calls`` calls of each runtime back to back, so a load change on a shared
machine hits all runtimes of a round alike. Prints images/s per round, the median per-round ratio to
Keras, and each runtime's largest relative feature difference to Keras (its fp32 tolerance check is
tests/test_backbone_runtimes.py). What decided ``featurizer.runtime``'s default.

    PYTHONPATH=lib .venv/bin/python bench/probe_runtimes.py [--rounds 6] [--threads 1] [--layer mixed5]
"""

from __future__ import annotations

import argparse
import sys
import time

import _bench_env  # noqa: F401 - lib/ importable
import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtimes", nargs="+", default=["keras", "onnxruntime", "openvino"])
    parser.add_argument("--model", default="InceptionV3")
    parser.add_argument("--layer", default="mixed5")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of every runtime (Keras too)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=2, help="timed calls per runtime per round")
    return parser.parse_args(argv)


def sample_batch(model_name: str, size: int) -> np.ndarray:
    from cxr_pipeline import paths
    from cxr_pipeline.images.decode import decode_image
    from cxr_pipeline.models.backbones import input_size, preprocess

    files = sorted(paths.SAMPLE_TREE.rglob("*.jpeg"))
    images = [decode_image(files[i % len(files)].read_bytes(), input_size(model_name)) for i in range(size)]
    return preprocess(model_name, np.stack(images))


def main(argv=None) -> int:
    args = parse_args(argv)
    from cxr_pipeline.models.runtimes import build_feature_model
    from cxr_pipeline.spark._udf import configure_tensorflow_threads

    configure_tensorflow_threads(args.threads)
    batch = sample_batch(args.model, args.batch_size)
    models = {}
    for runtime in args.runtimes:
        name, _, precision = runtime.partition(":")
        models[runtime] = build_feature_model(
            args.model, feature_layer=args.layer, runtime=name, precision=precision or "fp32", threads=args.threads
        )
    outputs = {runtime: np.asarray(model.predict_on_batch(batch)) for runtime, model in models.items()}  # warm
    reference = outputs[args.runtimes[0]]
    rates: dict[str, list[float]] = {runtime: [] for runtime in models}
    for round_ in range(args.rounds):
        order = list(models) if round_ % 2 == 0 else list(reversed(models))
        for runtime in order:
            started = time.perf_counter()
            for _ in range(args.calls):
                models[runtime].predict_on_batch(batch)
            rates[runtime].append(args.calls * args.batch_size / (time.perf_counter() - started))
        print("round", round_ + 1, "  ".join(f"{r} {rates[r][-1]:.2f}" for r in models), "images/s", flush=True)
    base = args.runtimes[0]
    print(f"\n{args.model} {args.layer}, batch {args.batch_size}, {args.threads} thread(s); per-round ratio to {base}:")
    for runtime in models:
        ratios = [rate / ref for rate, ref in zip(rates[runtime], rates[base])]
        difference = float(np.max(np.abs(outputs[runtime] - reference)) / np.max(np.abs(reference)))
        print(
            f"  {runtime:<16} median {np.median(rates[runtime]):6.2f} images/s   x{np.median(ratios):.2f} "
            f"(rounds {min(ratios):.2f}..{max(ratios):.2f})   max rel. feature difference {difference:.1e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
