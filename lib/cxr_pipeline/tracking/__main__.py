"""``python -m cxr_pipeline.tracking``: ``log`` a finished run folder later, ``resolve`` a registry URI to its
run folder, ``ui`` (make mlflow-ui): the MLflow UI on the configured store, on loopback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .. import config as cfg
from ..cli import Command, Job, add_config_options, run
from .registry import resolve_model
from .store import KINDS, TrackingSettings, artifact_root_for, ui_url, use_store


def _log_later(job: Job) -> int:
    """A finished run folder into MLflow after the fact (its job's MLflow was down): the record the job makes."""
    from ..infra import run_folder, storage

    args, config = job.args, job.config
    run_folder.require_complete(args.run)
    metrics = json.loads(storage.read_bytes(storage.join(args.run, "metrics.json")))
    data_uri = args.data or metrics.get("data") or cfg.require(config, "data.uri")
    if args.kind == "cnn":
        from ..cnn.mlflow_run import log_cnn_run

        return 0 if log_cnn_run(config, metrics, args.run, data_uri) else 1
    from ..spark.classifier.mlflow_run import log_saved_spark_run

    return 0 if log_saved_spark_run(config, args.run, metrics, data_uri, job.spark) else 1


def ui_command(settings: TrackingSettings, port: int) -> list[str]:
    """``mlflow ui`` on the configured store, bound to loopback only (one worker: 2-core machines)."""
    uri = settings.tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    root = artifact_root_for(uri)
    return command + (["--default-artifact-root", root] if root else [])


def _existing_experiment(settings: TrackingSettings) -> str | None:
    """The configured experiment's id when the store has it (the UI link opens its runs), else None."""
    if not settings.experiment:
        return None
    try:
        from mlflow.tracking import MlflowClient

        found = MlflowClient(use_store(settings)).get_experiment_by_name(settings.experiment)
    except Exception:  # noqa: BLE001 - a link to the UI's start page will do
        return None
    return found.experiment_id if found is not None else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cxr_pipeline.tracking",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_log = sub.add_parser("log", help="log a finished run folder to MLflow (e.g. after the server was down)")
    p_log.add_argument("run", help="run folder URI of train_featurizer.py or train_cnn.py")
    p_log.add_argument("--kind", choices=KINDS, required=True)
    p_log.add_argument("--data", help="data URI the run was trained on (default: the one in metrics.json)")
    add_config_options(p_log)
    p_res = sub.add_parser("resolve", help="print the local run folder of models:/NAME@ALIAS or models:/NAME/N")
    p_res.add_argument("model")
    add_config_options(p_res)
    p_ui = sub.add_parser("ui", help="the MLflow UI on the configured store, on 127.0.0.1 only (make mlflow-ui)")
    p_ui.add_argument("--port", type=int, default=5000)
    add_config_options(p_ui)
    return parser


def tracking_command(job: Job) -> int:
    args, config = job.args, job.config
    if args.command == "ui":
        settings = TrackingSettings.from_config(config)
        command = ui_command(settings, args.port)
        print(
            f"MLflow UI on {ui_url(f'http://127.0.0.1:{args.port}', _existing_experiment(settings))} "
            f"({command[command.index('--backend-store-uri') + 1]})",
            flush=True,
        )
        os.execv(command[0], command)
    if args.command == "resolve":
        print(resolve_model(args.model, config))
        return 0
    return _log_later(job)


COMMAND = Command(
    "tracking", build_parser, tracking_command, spark_app="cxr-tracking-log", errors=lambda: (ValueError, OSError)
)


def main(argv=None) -> int:
    return run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
