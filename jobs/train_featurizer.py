"""Train the pneumonia classifier on Spark: ImageFeaturizer -> StandardScaler -> LogisticRegression.

    scripts/spark-submit --master local[2] jobs/train_featurizer.py \\
        --data hdfs://127.0.0.1:9000/data/chest_xray --out hdfs://127.0.0.1:9000/runs/demo

Writes the run folder (config.yaml, model/, classifier.json, metrics.json, roc.png,
pr.png, confusion_matrix.png, threshold.png, rejected.csv, summary.txt) and prints
the summary. Defaults come from conf/ (--conf-env local|standalone|yarn); every
option can be overridden with --set section.key=value or the shortcuts below.
"""

from __future__ import annotations

import argparse
import sys

from cxr_pipeline.cli import Command, Job, add_config_options, run

SHORTCUTS = {  # option dest -> config key
    "reg_param": "training.reg_param",
    "elastic_net_param": "training.elastic_net_param",
    "max_iter": "training.max_iter",
    "class_weighting": "training.class_weighting",
    "tuning": "training.tuning",
    "validation": "training.validation",
    "validation_fraction": "training.validation_fraction",
    "threshold_rule": "training.threshold_rule",
    "cost_fn": "training.cost_fn",
    "cost_fp": "training.cost_fp",
    "target_sensitivity": "training.target_sensitivity",
    "seed": "training.seed",
    "features_cache": "training.features_cache",
    "backbone_run": "featurizer.backbone_run",
    "model_name": "featurizer.model_name",
    "feature_layer": "featurizer.feature_layer",
    "image_size": "featurizer.image_size",
    "batch_size": "featurizer.batch_size",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_featurizer.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=None, help="dataset root URI with train/ val/ test/ (default: data.uri)")
    parser.add_argument(
        "--out",
        required=True,
        help="run folder URI (local path, file:// or hdfs://); must be new " "or empty unless --overwrite",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing run folder at --out (only one this tool wrote)"
    )
    add_config_options(parser)
    t = parser.add_argument_group("training shortcuts (same as --set training.*)")
    t.add_argument("--reg-param", type=float)
    t.add_argument("--elastic-net-param", type=float)
    t.add_argument("--max-iter", type=int)
    t.add_argument("--class-weighting", dest="class_weighting", action="store_true", default=None)
    t.add_argument("--no-class-weighting", dest="class_weighting", action="store_false")
    t.add_argument("--tuning", choices=("none", "cv", "tvs"))
    t.add_argument(
        "--validation",
        choices=("carve", "folder"),
        help="carve = patient-grouped slice of train (default); folder = the dataset's val/",
    )
    t.add_argument("--validation-fraction", type=float)
    t.add_argument(
        "--threshold-rule",
        choices=("sensitivity", "youden", "cost", "fixed"),
        help="how validation picks the decision threshold (default: training.threshold_rule)",
    )
    t.add_argument("--target-sensitivity", type=float, help="with --threshold-rule sensitivity")
    t.add_argument("--cost-fn", type=float, help="with --threshold-rule cost: price of a missed pneumonia")
    t.add_argument("--cost-fp", type=float, help="with --threshold-rule cost: price of a false alarm")
    t.add_argument("--seed", type=int)
    t.add_argument("--features-cache", help="root URI of the feature cache (default: next to the run)")
    f = parser.add_argument_group("featurizer shortcuts (same as --set featurizer.*)")
    f.add_argument(
        "--backbone-run",
        help="a train_cnn run folder (--model inception_v3): featurize with its fine-tuned backbone "
        "(sets the model, weights, layer and image size)",
    )
    f.add_argument("--model-name")
    f.add_argument("--feature-layer")
    f.add_argument("--image-size", type=int, help="square input side (default: the backbone's own)")
    f.add_argument("--batch-size", type=int)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def train_featurizer(job: Job) -> int:
    from cxr_pipeline import config as cfg
    from cxr_pipeline.infra import run_folder
    from cxr_pipeline.models.weights import default_weights_path
    from cxr_pipeline.spark.classifier.mlflow_run import log_spark_run
    from cxr_pipeline.spark.classifier.training import featurizer_for, train

    args = job.args
    data_uri = args.data or cfg.require(job.config, "data.uri")
    run_folder.check_output(args.out, args.overwrite)  # before Spark starts and hours of work
    config, featurizer = featurizer_for(job.config)  # the backbone and its default weights, likewise
    if featurizer.weights is None:
        default_weights_path(featurizer.model_name)
    result = train(job.spark, config, data_uri, args.out, overwrite=args.overwrite, featurizer=featurizer)
    log_spark_run(job.config, result, data_uri, job.spark, started_at=job.started_at)  # trouble only warns
    print("\n=== cxr-pipeline training summary ===")
    print(result.summary, end="")
    print(f"run folder: {result.run.root}")
    return 0


def _known_errors() -> tuple[type[BaseException], ...]:
    from cxr_pipeline.infra.run_folder import OutputExistsError
    from cxr_pipeline.models.weights import WeightsNotFound
    from cxr_pipeline.spark.classifier.training import TrainingError

    return (OutputExistsError, WeightsNotFound, TrainingError, ValueError)


COMMAND = Command(
    "train_featurizer",
    build_parser,
    train_featurizer,
    spark_app="cxr-train-featurizer",
    errors=_known_errors,
    shortcuts=lambda args: [(key, getattr(args, dest)) for dest, key in SHORTCUTS.items()],
)


def main(argv=None) -> int:
    return run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
