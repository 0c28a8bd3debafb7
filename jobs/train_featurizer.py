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
import os
import sys
import time

try:  # the one bootstrap of every entry script: the installed package (make venv; the wheel on a cluster) ...
    import cxr_pipeline  # noqa: F401
except ImportError:  # ... else the checkout's lib/
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))

from cxr_pipeline.cli import add_config_options, configure_logging, resolve_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
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
    return parser.parse_args(argv)


def main(argv=None) -> int:
    started = time.time()  # the MLflow run spans the job from here
    args = parse_args(argv)
    configure_logging(args.verbose)
    config = resolve_config(
        args,
        [
            ("training.reg_param", args.reg_param),
            ("training.elastic_net_param", args.elastic_net_param),
            ("training.max_iter", args.max_iter),
            ("training.class_weighting", args.class_weighting),
            ("training.tuning", args.tuning),
            ("training.validation", args.validation),
            ("training.validation_fraction", args.validation_fraction),
            ("training.threshold_rule", args.threshold_rule),
            ("training.cost_fn", args.cost_fn),
            ("training.cost_fp", args.cost_fp),
            ("training.target_sensitivity", args.target_sensitivity),
            ("training.seed", args.seed),
            ("training.features_cache", args.features_cache),
            ("featurizer.backbone_run", args.backbone_run),
            ("featurizer.model_name", args.model_name),
            ("featurizer.feature_layer", args.feature_layer),
            ("featurizer.image_size", args.image_size),
            ("featurizer.batch_size", args.batch_size),
        ],
    )
    from cxr_pipeline import config as cfg
    from cxr_pipeline.infra import run_folder, storage
    from cxr_pipeline.models.weights import WeightsNotFound, default_weights_path
    from cxr_pipeline.spark.classifier.mlflow_run import log_spark_run
    from cxr_pipeline.spark.classifier.training import TrainingError, train
    from cxr_pipeline.spark.featurizer import FeaturizerSettings
    from cxr_pipeline.spark.session import spark_job

    data_uri = args.data or cfg.require(config, "data.uri")
    storage.configure(config)
    run_folder.configure(config)
    try:
        run_folder.check_output(args.out, args.overwrite)  # before Spark starts and hours of work
        featurizer = FeaturizerSettings.from_config(config)  # the backbone and its default weights, likewise
        if featurizer.weights is None:
            default_weights_path(featurizer.model_name)
    except (run_folder.OutputExistsError, ValueError, WeightsNotFound) as exc:
        print(f"train_featurizer: error: {exc}", file=sys.stderr)
        return 2
    try:
        with spark_job(config, "cxr-train-featurizer", master=args.master, verbose=args.verbose) as spark:
            result = train(spark, config, data_uri, args.out, overwrite=args.overwrite)
            log_spark_run(config, result, data_uri, spark, started_at=started)  # trouble only warns
    except (TrainingError, cfg.ConfigError, run_folder.OutputExistsError) as exc:
        print(f"train_featurizer: error: {exc}", file=sys.stderr)
        return 2
    print("\n=== cxr-pipeline training summary ===")
    print(result.summary, end="")
    print(f"run folder: {result.run.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
