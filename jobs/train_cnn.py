#!/usr/bin/env python
"""Train a Keras CNN on the chest_xray tree (local path or any Hadoop URI, e.g. the local HDFS).

    .venv/bin/python jobs/train_cnn.py --data hdfs://127.0.0.1:9000/data/chest_xray \\
        --out hdfs://127.0.0.1:9000/runs/cnn --model inception_v3 --epochs 5

Runs on CPU, or on every local GPU (MirroredStrategy, mixed precision, XLA) with
no change. Defaults: conf/defaults.yaml `cnn:` (+ `training:` for the validation
carve, seed and target sensitivity); options below are shortcuts for --set cnn.KEY=V.
Writes RUN/: model.keras, cnn.json, metrics.json, config.yaml, history.csv, predictions.csv,
training_curves.png, roc.png, confusion_matrix.png, confusion_matrix_0.5.png, rejected.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from cxr_pipeline.cli import Command, Job, add_config_options, run  # noqa: E402

SHORTCUTS = {  # option dest -> config key
    "data": "data.uri",
    "model": "cnn.model",
    "epochs": "cnn.epochs",
    "batch_size": "cnn.batch_size",
    "image_size": "cnn.image_size",
    "learning_rate": "cnn.learning_rate",
    "balance": "cnn.balance",
    "cache": "cnn.cache",
    "fine_tune_epochs": "cnn.fine_tune.epochs",
    "feature_layer": "cnn.inception.feature_layer",
    "weights": "cnn.inception.weights",
    "seed": "training.seed",
    "verbose": "cnn.verbose",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_cnn.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="dataset root URI (default: conf data.uri)")
    parser.add_argument("--out", required=True, help="run folder: local path or hdfs:// URI")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing run folder at --out (only one this tool wrote)"
    )
    parser.add_argument("--model", choices=("small_cnn", "inception_v3"))
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int, help="per replica (GPU); the global batch is this x replicas")
    parser.add_argument("--image-size", type=int, help="square input side (small_cnn >= 32, inception_v3 >= 75)")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--balance", choices=("class_weight", "oversample", "none"))
    parser.add_argument("--cache", choices=("memory", "disk", "none"), help="where decoded images are cached")
    parser.add_argument("--fine-tune-epochs", type=int, help="inception_v3: epochs of phase 2 (top blocks unfrozen)")
    parser.add_argument(
        "--feature-layer",
        "--cut-layer",
        dest="feature_layer",
        help="inception_v3: last backbone block used (mixed0..mixed10); --cut-layer is the old name",
    )
    parser.add_argument("--weights", help="inception_v3: .weights.h5 file (default: provisioned by `make weights`)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--verbose", type=int, choices=(0, 1, 2), help="Keras progress: 1 bars, 2 epoch lines, 0 none")
    add_config_options(parser, spark=False, verbose=False)  # --verbose here is Keras's progress
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def train_cnn(job: Job) -> int:
    from cxr_pipeline import config as cfg
    from cxr_pipeline.models.tensorflow_runtime import import_tensorflow

    import_tensorflow()  # before cnn.train imports Keras: TensorFlow's start-up notices stay off the console
    from cxr_pipeline.cnn.mlflow_run import log_cnn_run
    from cxr_pipeline.cnn.train import train_and_evaluate

    args, config = job.args, job.config
    data_uri = cfg.require(config, "data.uri")
    metrics = train_and_evaluate(config, data_uri, args.out, overwrite=args.overwrite)
    log_cnn_run(config, metrics, args.out, data_uri, started_at=job.started_at)  # MLflow trouble only warns
    name = metrics["evaluated_on"]
    summary = {k: metrics[name][k] for k in ("n", "auc")}
    summary.update({f"{k}@0.5": metrics[name]["at_0.5"][k] for k in ("accuracy", "sensitivity", "specificity")})
    summary["threshold"] = metrics["threshold"]
    summary.update(
        {f"{k}@threshold": metrics[name]["at_threshold"][k] for k in ("accuracy", "sensitivity", "specificity")}
    )
    print(json.dumps({name: summary}, indent=2, default=float))
    return 0


def _known_errors() -> tuple[type[BaseException], ...]:
    from cxr_pipeline.infra.run_folder import OutputExistsError

    return (OutputExistsError,)


COMMAND = Command(
    "train_cnn",
    build_parser,
    train_cnn,
    verbose_logs=False,
    errors=_known_errors,
    shortcuts=lambda args: [(key, getattr(args, dest)) for dest, key in SHORTCUTS.items()],
)


def main(argv=None) -> int:
    return run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
