"""The options every entry point shares, how they become the config, and the console's logging."""

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
