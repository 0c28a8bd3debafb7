"""Command-line plumbing shared by the jobs: config options and job bootstrap."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from .. import config as cfg


def add_config_options(parser: argparse.ArgumentParser, *, spark: bool = True, verbose: bool = True) -> None:
    """The options every entry point shares: ``--conf-env``, ``--conf``, ``--set``; Spark jobs add ``--master``;
    ``verbose``: ``--verbose`` for the log level (off where the tool has its own ``--verbose``/``--log-level``)."""
    group = parser.add_argument_group("configuration (conf/defaults.yaml <- conf/ENV.yaml <- --conf <- --set)")
    group.add_argument(
        "--conf-env",
        default=None,
        choices=cfg.ENVIRONMENTS,
        help="environment config in conf/ (default: $CXR_ENV or local)",
    )
    group.add_argument("--conf", action="append", default=[], metavar="FILE", help="extra YAML config file(s)")
    group.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set training.reg_param=0.1 (repeatable)",
    )
    if spark:
        group.add_argument("--master", default=None, help="Spark master (default: spark-submit's, else spark.master)")
    if verbose:
        group.add_argument(
            "--verbose",
            action="store_true",
            help="show Spark's INFO logs and this package's debug messages (default: warnings and progress)",
        )


def configure_logging(verbose: bool = False) -> None:
    """The jobs' console: this package's progress messages, everyone else's warnings (``verbose``: all INFO)."""
    import logging

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("cxr_pipeline").setLevel(logging.DEBUG if verbose else logging.INFO)
    # MLflow sets up its own INFO logger when imported (from MLFLOW_LOGGING_LEVEL); the tracking module already
    # says what it recorded, in one line. A level the user exported wins.
    import os

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())


def resolve_config(args: argparse.Namespace, shortcuts: Sequence[tuple[str, Any]] = ()) -> dict[str, Any]:
    """Config from the files, then ``--set``, then the job's own shortcuts (``(dotted, value)``; None = unset)."""
    overrides = list(args.set)
    for dotted, value in shortcuts:
        if value is not None:
            overrides.append(f"{dotted}={_yaml_scalar(value)}")
    return cfg.load_config(args.conf_env, args.conf, overrides)


def _yaml_scalar(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def missing_on_this_machine(path: str, config: dict[str, Any]) -> str | None:
    """None when ``path`` is a URI (``hdfs://``, ``models:/``, ...) or exists here; else the sentence saying it does
    not, naming the same path on the default HDFS (``hdfs.namenode_uri``) when it is there: the demo and the
    notebooks write their runs to HDFS, and ``runs/demo`` reads like a local folder."""
    import os

    if "://" in path or path.startswith("models:/") or os.path.exists(path):
        return None
    message = f"{path} does not exist on this machine"
    twin = hdfs_twin(path, config)
    return f"{message}; {twin} does: pass that URI" if twin else message


def hdfs_twin(path: str, config: dict[str, Any]) -> str | None:
    """``<hdfs.namenode_uri>/<path>`` (relative paths taken from the root) when it exists; None when it does
    not or HDFS cannot be asked."""
    import posixpath

    from ..infra import storage

    namenode = str(cfg.get(config, "hdfs.namenode_uri") or "").rstrip("/")
    relative = posixpath.normpath(path).lstrip("/")
    if not namenode.startswith("hdfs://") or relative.startswith(".."):
        return None
    twin = f"{namenode}/{relative}"
    try:
        storage.configure(config)
        return twin if storage.exists(twin) else None
    except (OSError, ValueError):  # HDFS down or not configured: no hint, the plain message stands
        return None
