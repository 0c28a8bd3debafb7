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
import os
import sys

try:  # the one bootstrap of every entry script: the installed package (make venv; the wheel on a cluster) ...
    import cxr_pipeline  # noqa: F401
except ImportError:  # ... else the checkout's lib/
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))

from cxr_pipeline.cli import add_config_options, configure_logging, resolve_config  # noqa: E402

OUTPUT_LABELS = {"parquet": "predictions", "csv": "predictions (CSV)", "unreadable": "unreadable files"}


def parse_args(argv=None) -> argparse.Namespace:
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
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = resolve_config(args)
    configure_logging(args.verbose)
    from cxr_pipeline import tracking
    from cxr_pipeline.cli import missing_on_this_machine
    from cxr_pipeline.infra import run_folder, storage
    from cxr_pipeline.models.backbones import BackboneError
    from cxr_pipeline.spark.classifier.prediction import predict_images
    from cxr_pipeline.spark.session import spark_job

    storage.configure(config)
    run_folder.configure(config)
    try:
        missing = missing_on_this_machine(args.model, config)
        if missing:
            raise FileNotFoundError(f"--model {missing}")
        args.model = tracking.resolve_model(args.model, config)  # models:/NAME@ALIAS -> its run folder
        run_folder.require_complete(args.model)
        run_folder.check_output(args.out, args.overwrite)
    except (FileNotFoundError, run_folder.OutputExistsError, ValueError) as exc:
        print(f"predict: error: {exc}", file=sys.stderr)
        return 2
    print(f"predict: scoring {args.images} with {args.model} into {args.out}", flush=True)
    try:
        with spark_job(config, "cxr-predict", master=args.master, verbose=args.verbose) as spark:
            summary = predict_images(
                spark,
                args.model,
                args.images,
                args.out,
                csv=args.csv,
                threshold=args.threshold,
                overwrite=args.overwrite,
            )
    except (FileNotFoundError, BackboneError, run_folder.OutputExistsError) as exc:
        print(f"predict: error: {exc}", file=sys.stderr)
        return 2
    classes = ", ".join(f"{k} {v}" for k, v in sorted(summary.by_class.items())) or "none"
    print(f"scored {summary.scored} image(s): {classes}; unreadable {summary.unreadable}")
    for kind, uri in summary.files.items():
        print(f"{OUTPUT_LABELS[kind]}: {uri}")
    print(f'in pandas: from cxr_pipeline.infra.tables import read_table; read_table("{summary.files["parquet"]}")')
    return 0


if __name__ == "__main__":
    sys.exit(main())
