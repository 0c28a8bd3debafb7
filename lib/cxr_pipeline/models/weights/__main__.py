"""``python -m cxr_pipeline.models.weights provision|verify|path`` (``make weights``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cxr_pipeline import paths
from cxr_pipeline.cli import Command, Job, add_config_options, run
from cxr_pipeline.infra import registry_assets
from cxr_pipeline.models.weights import WEIGHT_FILES, WeightsNotFound, default_weights_path, stage_to_hdfs
from cxr_pipeline.models.weights.provisioning import STAMP_NAME, WeightsVerificationError, _log, provision, verify


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cxr_pipeline.models.weights",
        description="Provision (convert offline from registry packages) and verify pretrained backbone weights.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    prov = sub.add_parser("provision", help="download, convert and verify the weights (make weights)")
    prov.add_argument("--models", default=",".join(WEIGHT_FILES), help="comma-separated (default: %(default)s)")
    prov.add_argument("--force", action="store_true", help="convert again even if already provisioned")
    prov.add_argument("--stage-hdfs", metavar="URI", help="also upload the files into this folder URI")
    prov.add_argument("--weights-dir", type=Path, default=paths.WEIGHTS_DIR, help="default: %(default)s")
    ver = sub.add_parser("verify", help="recompute checksums of the provisioned weights")
    ver.add_argument("--models", default=",".join(WEIGHT_FILES))
    ver.add_argument("--weights-dir", type=Path, default=paths.WEIGHTS_DIR)
    path_cmd = sub.add_parser("path", help="print the provisioned weights file of a model")
    path_cmd.add_argument("model_name")
    path_cmd.add_argument("--weights-dir", type=Path, default=paths.WEIGHTS_DIR)
    for command in (prov, ver, path_cmd):
        add_config_options(command, spark=False, verbose=False)
    return parser


def weights(job: Job) -> int:
    args = job.args
    if args.command == "path":
        print(default_weights_path(args.model_name, args.weights_dir))
        return 0
    from cxr_pipeline.models.tensorflow_runtime import import_tensorflow

    import_tensorflow()  # before provisioning imports Keras: TensorFlow's start-up notices stay off the console
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.command == "verify":
        verify(models, args.weights_dir)
        return 0
    provision(models, args.weights_dir, force=args.force)
    verify(models, args.weights_dir)
    if args.stage_hdfs:
        for model_name in models:
            target = stage_to_hdfs(model_name, args.stage_hdfs.rstrip("/") + "/", args.weights_dir)
            _log(f"{model_name}: staged to {target}")
    (args.weights_dir / STAMP_NAME).touch()
    return 0


COMMAND = Command(
    "weights",
    build_parser,
    weights,
    errors=lambda: (WeightsNotFound, WeightsVerificationError, registry_assets.AssetError, ValueError),
)


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
