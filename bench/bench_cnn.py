#!/usr/bin/env python
"""Training throughput of the CNN job, per model, and how much of a step waits for input.

For each model it builds the job's own pipeline (imaging decode -> cache ->
shuffle -> augmentation -> batch -> prefetch) over a tree of full-size JPEGs and
measures, in one process:

* epoch 1: decode + cache fill + training (cold), and epoch 2 from the cache (warm),
  in training images/s;
* a third epoch step by step (``train_on_batch``): the share of step time spent
  blocked waiting for the next batch (0 = input never waits);
* input only: the pipeline iterated without a model, images/s.

Runs on whatever devices TensorFlow sees (prints which); compare figures as
ratios within one run (other processes on the same cores change absolute values).

    PYTHONPATH=lib .venv/bin/python bench/bench_cnn.py --n 256 --models small_cnn,inception_v3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_SIZES = {"small_cnn": 150, "inception_v3": 299}


def configured_cnn():
    """The ``cnn:`` settings of conf/ (the bench's own choices are its arguments)."""
    from cxr_pipeline.cnn.settings import CnnSettings
    from cxr_pipeline.config import load_config

    return CnnSettings.from_config(load_config())


def make_tree(root: Path, n: int, size: str) -> Path:
    from cxr_pipeline.datasets import synthetic

    tree = root / "chest_xray"
    width, height = synthetic.parse_size(size)
    synthetic.generate(tree, n, width, height, splits=("train",))
    return tree


def bench_model(
    name: str, image_size: int, records, batch_size: int, devices, strategy, feature_layer: str, augment_on: str
) -> dict:
    import keras

    from cxr_pipeline.cnn import data, models
    from cxr_pipeline.cnn.train import EpochTimer, compile_model

    settings = configured_cnn()

    rejections = data.Rejections()
    decoded = data.with_length(data.decoded_dataset(records, image_size, rejections, cache="memory"), len(records))
    labels = [r.label for r in records]
    augment = data.augmenter(**asdict(settings.augment), seed=1)
    in_model = augment_on == "model"
    train_input, _ = data.training_dataset(
        decoded,
        labels,
        batch_size,
        seed=1,
        augment=None if in_model else augment,
        balance=settings.balance,
        shuffle_buffer=settings.shuffle_buffer,
    )
    with strategy.scope():
        options = {**asdict(settings.inception), "feature_layer": feature_layer} if name == "inception_v3" else {}
        model = models.build_model(name, image_size, **options)
        if in_model:
            model = keras.Sequential([keras.Input(model.input_shape[1:]), augment, model])
        compile_model(model, 1e-3, devices.xla)

    # Cold epoch (decode + cache fill + train), then a warm one from the cache.
    timer = EpochTimer(len(records))
    model.fit(train_input, epochs=2, verbose=0, callbacks=[timer], shuffle=False)
    cold_s, warm_s = timer.seconds

    # One more epoch step by step: time blocked in next() (input) vs the whole step.
    model.train_on_batch(*next(iter(train_input)))  # traces train_on_batch outside the timing
    waited = total = 0.0
    iterator = iter(train_input)
    while True:
        start = time.perf_counter()
        try:
            x, y = next(iterator)
        except StopIteration:
            break
        got = time.perf_counter()
        model.train_on_batch(x, y)
        waited += got - start
        total += time.perf_counter() - start

    # Input only: the warm pipeline without a model.
    start = time.perf_counter()
    for _ in train_input:
        pass
    input_s = time.perf_counter() - start
    n = len(records)
    return {
        "model": name,
        "size": image_size,
        "images": n - len(rejections.items),
        "cold_img_s": n / cold_s,
        "warm_img_s": n / warm_s,
        "stepwise_img_s": n / total,
        "input_img_s": n / input_s,
        "wait_share": waited / total,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="synthetic training images (default: %(default)s)")
    parser.add_argument("--jpeg-size", default="1200x1000", help="WIDTHxHEIGHT of the JPEGs (default: %(default)s)")
    parser.add_argument("--models", default="small_cnn,inception_v3")
    parser.add_argument("--batch-size", type=int, default=32, help="per replica (default: %(default)s)")
    parser.add_argument("--inception-size", type=int, default=DEFAULT_SIZES["inception_v3"])
    parser.add_argument(
        "--feature-layer",
        "--cut-layer",
        dest="feature_layer",
        help="inception_v3 backbone end (default: cnn.inception.feature_layer)",
    )
    parser.add_argument(
        "--augment-on",
        default="auto",
        help="where augmentation runs: auto (as the job), pipeline, model, or a list "
        "such as pipeline,model to compare both in one run (default: %(default)s)",
    )
    parser.add_argument("--data", help="use this tree instead of generating one (local path or hdfs:// URI)")
    args = parser.parse_args(argv)

    import keras

    from cxr_pipeline.cnn import data
    from cxr_pipeline.cnn.train import augment_placement, configure_devices

    settings = configured_cnn()
    devices, strategy = configure_devices(settings.mixed_precision, settings.xla)
    keras.utils.set_random_seed(1)
    print(devices.describe())
    placements = [augment_placement(p, devices) for p in args.augment_on.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_cnn_") as tmp:
        tree = args.data or str(make_tree(Path(tmp), args.n, args.jpeg_size))
        records, _ = data.list_image_tree(tree)
        records = [r for r in records if r.split == "train"][: args.n]
        batch = args.batch_size * devices.replicas
        print(
            f"{len(records)} training JPEGs ({args.jpeg_size if not args.data else tree}), batch {batch}, "
            f"augmentation on, cache in memory"
        )
        header = (
            f"{'model':13s} {'px':>4s} {'augment in':>10s} {'epoch1 img/s':>13s} {'epoch2 img/s':>13s} "
            f"{'stepwise img/s':>15s} {'input img/s':>12s} {'input wait':>11s}"
        )
        print(header)
        for name in args.models.split(","):
            for augment_on in placements:
                size = args.inception_size if name == "inception_v3" else DEFAULT_SIZES[name]
                layer = args.feature_layer or settings.inception.feature_layer
                r = bench_model(name, size, records, batch, devices, strategy, layer, augment_on)
                print(
                    f"{r['model']:13s} {r['size']:4d} {augment_on:>10s} "
                    f"{r['cold_img_s']:13.1f} {r['warm_img_s']:13.1f} "
                    f"{r['stepwise_img_s']:15.1f} {r['input_img_s']:12.1f} {r['wait_share']:10.1%}",
                    flush=True,
                )
    print(
        "epoch1 = decode + cache fill + train (+ graph tracing); epoch2 = from the cache (model.fit); "
        "stepwise = a third epoch with train_on_batch; input wait = share of that epoch's step time "
        "spent blocked on the next batch; input = the pipeline alone"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
