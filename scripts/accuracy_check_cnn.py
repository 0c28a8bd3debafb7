#!/usr/bin/env python
"""Accuracy check of the CNN job on PneumoniaMNIST (a script, not a test).

Lays the npz out as a chest_xray tree (28 px JPEGs; the job upscales them to
--image-size when decoding), with the npz ``val`` split as the tree's ``test``
folder, then runs the real training job (patient-grouped carve of ``train`` for
validation, callbacks, threshold chosen on that carve) and reports accuracy,
AUC, sensitivity and specificity on the npz ``val`` split against the MedMNIST v2
references.

    PYTHONPATH=lib .venv/bin/python scripts/accuracy_check_cnn.py      # InceptionV3 transfer, 96 px (~13 min, 2 cores)
    PYTHONPATH=lib .venv/bin/python scripts/accuracy_check_cnn.py --model small_cnn --image-size 64 --epochs 15
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from cxr_pipeline import config as config_mod  # noqa: E402

REFERENCES = {  # MedMNIST v2 (Yang et al. 2023), PneumoniaMNIST test split
    "MedMNIST v2 ResNet-50 (224)": {"accuracy": 0.884, "auc": 0.962},
    "Google AutoML Vision": {"accuracy": 0.946, "auc": 0.991},
}


def build_tree(npz: Path, root: Path) -> Path:
    """<root>/chest_xray/{train,test}/{NORMAL,PNEUMONIA}/*.jpeg at the native 28 px (test = npz val)."""
    from cxr_pipeline.datasets import medmnist

    tree = root / "chest_xray"
    if (tree / "test").is_dir() and (tree / "train").is_dir():
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    medmnist.convert(npz, tree, size=0, splits=("train", "val"))
    (tree / "val").rename(tree / "test")
    (tree / medmnist.README_NAME).unlink(missing_ok=True)
    return tree


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--npz", type=Path, default=REPO.parent / "shared" / "data" / "pneumoniamnist_28_trainval.npz")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cxr_accuracy_cnn"), help="tree + run folder")
    parser.add_argument("--model", default="inception_v3", choices=("small_cnn", "inception_v3"))
    parser.add_argument("--image-size", type=int, default=96, help="the 28 px images are upscaled to this")
    parser.add_argument("--epochs", type=int, default=6, help="phase 1 (frozen backbone for inception_v3)")
    parser.add_argument(
        "--feature-layer",
        "--cut-layer",
        dest="feature_layer",
        help="inception_v3: last backbone block (default: cnn.inception.feature_layer)",
    )
    parser.add_argument("--fine-tune-epochs", type=int, default=4, help="inception_v3: phase 2 epochs")
    parser.add_argument(
        "--fine-tune-lr", type=float, help="inception_v3: phase 2 learning rate (default: cnn.fine_tune.learning_rate)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    args = parser.parse_args(argv)

    from cxr_pipeline.cnn.train import train_and_evaluate

    tree = build_tree(args.npz, args.work)
    config = config_mod.load_config(
        "local",
        overrides=[
            f"cnn.model={args.model}",
            f"cnn.image_size={args.image_size}",
            f"cnn.epochs={args.epochs}",
            *([f"cnn.inception.feature_layer={args.feature_layer}"] if args.feature_layer else []),
            f"cnn.fine_tune.epochs={args.fine_tune_epochs}",
            *([f"cnn.fine_tune.learning_rate={args.fine_tune_lr}"] if args.fine_tune_lr else []),
            "cnn.cache=memory",
            "cnn.verbose=2",
            "training.validation_fraction=0.1",
            *args.set,
        ],
    )
    started = time.perf_counter()
    metrics = train_and_evaluate(config, str(tree), str(args.work / "run"))
    minutes = (time.perf_counter() - started) / 60
    test = metrics["test"]
    detail = f", cut {config['cnn']['inception']['feature_layer']}" if args.model == "inception_v3" else ""
    print(
        f"\nPneumoniaMNIST val split (n={test['n']}, NORMAL/PNEUMONIA {test['class_counts']}): "
        f"{args.model} at {args.image_size} px{detail}, {len(metrics['history']['loss'])} epochs, {minutes:.1f} min"
    )
    print("(the references are on the MedMNIST test split, which is not in this npz)")
    print(f"{'':34s} {'ACC':>6s} {'AUC':>6s} {'sens':>6s} {'spec':>6s}")
    for key, name in (
        ("at_0.5", "threshold 0.5"),
        ("at_threshold", f"validation threshold {metrics['threshold']:.3f}"),
    ):
        r = test[key]
        print(f"{name:34s} {r['accuracy']:6.3f} {test['auc']:6.3f} {r['sensitivity']:6.3f} {r['specificity']:6.3f}")
    for name, ref in REFERENCES.items():
        print(f"{name:34s} {ref['accuracy']:6.3f} {ref['auc']:6.3f}")
    print(
        json.dumps(
            {
                "model": args.model,
                "image_size": args.image_size,
                "minutes": round(minutes, 1),
                "accuracy@0.5": test["at_0.5"]["accuracy"],
                "auc": test["auc"],
                "sensitivity@0.5": test["at_0.5"]["sensitivity"],
                "specificity@0.5": test["at_0.5"]["specificity"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
