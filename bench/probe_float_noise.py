"""How far float32 model outputs move between TensorFlow code paths, and how far real mistakes move them.

The figures behind ``tests/tolerances.py``. Run it twice, once per TensorFlow code path, and
compare (TensorFlow chooses oneDNN or Eigen kernels at import time, so one process is one path):

    .venv/bin/python bench/probe_float_noise.py --save /tmp/onednn.npz
    TF_ENABLE_ONEDNN_OPTS=0 .venv/bin/python bench/probe_float_noise.py --save /tmp/eigen.npz \
        --compare /tmp/onednn.npz

Each run prints, on the 16 real sample X-rays: the spread between batch sizes (1 vs 16) within
this process, and the effect of real mistakes (another layer, other weights, another resize, no
``preprocess_input``) on the pooled features and on a logistic-regression probability. With
``--compare`` it also prints the spread against the other code path's saved outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cxr_pipeline import paths  # noqa: E402
from cxr_pipeline.images.decode import decode_image  # noqa: E402
from cxr_pipeline.models.backbones import build_backbone, featurize_arrays  # noqa: E402

LAYER = "mixed5"


def sample_images(side: int) -> np.ndarray:
    files = sorted(paths.SAMPLE_TREE.rglob("*.jpeg"))
    return np.stack([decode_image(f.read_bytes(), (side, side)) for f in files])


def probabilities(features: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """A fixed logistic regression standing in for the trained one: unit-norm weights on standardised features."""
    mean, std = reference.mean(0), reference.std(0) + 1e-6
    w = np.random.default_rng(0).normal(size=features.shape[1])
    w /= np.linalg.norm(w) / 3.0  # logits of O(1..3), like a fitted classifier's
    return 1.0 / (1.0 + np.exp(-(((features - mean) / std) @ w)))


def spread(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    diff = np.abs(a - b)
    return float(diff.max()), float((diff / (np.abs(b) + 1e-3)).max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=299)
    parser.add_argument("--save", help="write this run's features to an .npz")
    parser.add_argument("--compare", help="an .npz written by another run (another TF code path)")
    args = parser.parse_args(argv)

    batch = sample_images(args.side)
    model = build_backbone("InceptionV3", feature_layer=LAYER, image_size=args.side)
    full = featurize_arrays(model, "InceptionV3", batch, batch_size=16)
    single = featurize_arrays(model, "InceptionV3", batch, batch_size=1)
    p_full = probabilities(full, full)

    rows = [("batch 16 vs batch 1 (same process)", full, single)]
    if args.compare:
        other = np.load(args.compare)["features"]
        rows.append((f"this code path vs {Path(args.compare).name}", full, other))
    other_layer = featurize_arrays(
        build_backbone("InceptionV3", feature_layer="mixed4", image_size=args.side), "InceptionV3", batch, batch_size=16
    )
    rows.append(("MISTAKE: layer mixed4 instead of mixed5", full, other_layer))
    random_weights = featurize_arrays(
        build_backbone("InceptionV3", weights="random", feature_layer=LAYER, image_size=args.side),
        "InceptionV3",
        batch,
        batch_size=16,
    )
    rows.append(("MISTAKE: random instead of ImageNet weights", full, random_weights))
    shifted = np.roll(batch, 1, axis=2)  # a one-pixel shift: the smallest plausible resize slip
    rows.append(("MISTAKE: image shifted by one pixel", full, featurize_arrays(model, "InceptionV3", shifted, 16)))
    raw = model.predict_on_batch(batch.astype("float32"))  # skipped preprocess_input
    rows.append(("MISTAKE: no preprocess_input", full, np.asarray(raw).reshape(len(batch), -1)))

    print(f"InceptionV3 {LAYER} at {args.side}px, {len(batch)} real sample X-rays")
    print(f"{'comparison':48s} {'feat max abs':>13s} {'feat max rel':>13s} {'prob max abs':>13s}")
    for name, a, b in rows:
        fa, fr = spread(a, b)
        pa, _ = spread(p_full, probabilities(b, full))
        print(f"{name:48s} {fa:13.2e} {fr:13.2e} {pa:13.2e}")
    if args.save:
        np.savez(args.save, features=full)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
