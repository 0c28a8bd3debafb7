"""Apply a trained run to new images: one row per image (path, probability, class, threshold).

    scripts/spark-submit --master local[2] jobs/predict.py --model hdfs://127.0.0.1:9000/runs/demo \\
        --images hdfs://127.0.0.1:9000/incoming/ --out hdfs://127.0.0.1:9000/predictions/today --csv

--images is a folder (searched recursively, any layout) or a Parquet table with
path + content columns (name ending in .parquet). Writes OUT/predictions.parquet,
OUT/predictions_csv/ with --csv, and OUT/unreadable.csv listing files that could
not be scored (they are reported, not fatal), and prints each path. In pandas:
cxr_pipeline.infra.tables.read_table(OUT + "/predictions.parquet").
"""

from __future__ import annotations

import argparse
import sys

from cxr_pipeline.cli import Command, Job, add_config_options, run

OUTPUT_LABELS = {"parquet": "predictions", "csv": "predictions (CSV)", "unreadable": "unreadable files"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="predict.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        required=True,
        help="run folder written by train_featurizer.py, or a registered "
        "model models:/cxr-pneumonia-spark@champion (MLflow, tracking.* settings)",
    )
    parser.add_argument("--images", required=True, help="folder or .parquet table of images (URI)")
    parser.add_argument("--out", required=True, help="output folder URI (new or empty unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier predictions at --out")
    parser.add_argument("--csv", action="store_true", help="also write CSV")
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="decision threshold on P(PNEUMONIA) (default: the run's validation-chosen one)",
    )
    add_config_options(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def predict(job: Job) -> int:
    from cxr_pipeline import tracking
    from cxr_pipeline.cli import missing_on_this_machine
    from cxr_pipeline.infra import run_folder
    from cxr_pipeline.spark.classifier.prediction import predict_images

    args, config = job.args, job.config
    missing = missing_on_this_machine(args.model, config)
    if missing:
        raise FileNotFoundError(f"--model {missing}")
    model = tracking.resolve_model(args.model, config)  # models:/NAME@ALIAS -> its run folder
    run_folder.require_complete(model)
    run_folder.check_output(args.out, args.overwrite)
    print(f"predict: scoring {args.images} with {model} into {args.out}", flush=True)
    summary = predict_images(
        job.spark, model, args.images, args.out, csv=args.csv, threshold=args.threshold, overwrite=args.overwrite
    )
    classes = ", ".join(f"{k} {v}" for k, v in sorted(summary.by_class.items())) or "none"
    print(f"scored {summary.scored} image(s): {classes}; unreadable {summary.unreadable}")
    for kind, uri in summary.files.items():
        print(f"{OUTPUT_LABELS[kind]}: {uri}")
    print(f'in pandas: from cxr_pipeline.infra.tables import read_table; read_table("{summary.files["parquet"]}")')
    return 0


def _known_errors() -> tuple[type[BaseException], ...]:
    from cxr_pipeline.infra.run_folder import OutputExistsError
    from cxr_pipeline.models.backbones import BackboneError

    return (FileNotFoundError, OutputExistsError, BackboneError, ValueError)


COMMAND = Command("predict", build_parser, predict, spark_app="cxr-predict", errors=_known_errors)


def main(argv=None) -> int:
    return run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
