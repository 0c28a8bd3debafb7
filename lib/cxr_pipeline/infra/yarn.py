"""The spark-submit command line for YARN, built from ``conf/yarn.yaml``.

YARN containers do not have our Python packages, so the job ships them:

* ``--archives cxr_env.tar.gz#environment``: a relocatable Python environment
  (``venv-pack`` or ``conda-pack`` of a venv holding requirements.txt + the project
  wheel), unpacked by YARN in every container as ``./environment``; driver and
  executors run ``./environment/bin/python``;
* ``--py-files dist/cxr_pipeline-*.whl`` (optional): the project wheel, so a new
  version of the code does not need a new environment archive.

``python -m cxr_pipeline.infra.yarn jobs/train_featurizer.py -- --data hdfs:///data/chest_xray --out hdfs:///runs/r1``
prints the command; ``--build-wheel`` builds the wheel first. YARN cannot be run
on the development machines: the command is checked, not executed, there.
"""

from __future__ import annotations

import argparse
import glob
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import config as cfg
from ..cli import Command, Job, add_config_options, run
from ..paths import REPO_ROOT

# spark.* settings that spark-submit takes as flags of their own.
_FLAG_CONF = {
    "spark.submit.deployMode": "--deploy-mode",
    "spark.yarn.dist.archives": "--archives",
    "spark.yarn.queue": "--queue",
    "spark.submit.pyFiles": "--py-files",
}


class YarnConfigError(cfg.ConfigError):
    pass


def build_wheel(out_dir: str | Path = REPO_ROOT / "dist") -> Path:
    """``pip wheel --no-deps`` of the project; returns the wheel's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out_dir),
            str(REPO_ROOT),
        ],
        check=True,
    )
    wheels = sorted(out_dir.glob("cxr_pipeline-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise FileNotFoundError(f"pip wheel wrote no cxr_pipeline wheel into {out_dir}")
    return wheels[-1]


def spark_submit_args(
    config: Mapping[str, Any],
    job: str,
    job_args: Sequence[str] = (),
    py_files: Sequence[str] | None = None,
    spark_submit: str | None = None,
) -> list[str]:
    """The full argument list (``argv[0]`` = spark-submit) for ``job`` on YARN."""
    spark_conf = flatten_conf(cfg.require(config, "spark.conf") or {})
    master = cfg.require(config, "spark.master")
    if master != "yarn":
        raise YarnConfigError(f"spark.master is {master!r}, not yarn: load the config with env 'yarn'")
    archives = spark_conf.get("spark.yarn.dist.archives")
    if not archives:
        raise YarnConfigError("spark.conf.spark.yarn.dist.archives (the packed Python environment) is not set")
    python = spark_conf.get("spark.pyspark.python")
    if not python:
        raise YarnConfigError("spark.conf.spark.pyspark.python must point into the unpacked environment")

    args = [spark_submit or cfg.require(config, "yarn.spark_submit"), "--master", "yarn"]
    files = list(py_files if py_files is not None else _as_list(cfg.require(config, "yarn.py_files")))
    for key, flag in _FLAG_CONF.items():
        value = spark_conf.pop(key, None)
        if key == "spark.yarn.queue":
            value = value or cfg.require(config, "yarn.queue")
        if key == "spark.submit.pyFiles" and value:
            files = _as_list(value) + files
            continue
        if value:
            args += [flag, str(value)]
    if files:
        args += ["--py-files", ",".join(files)]
    # In cluster mode the driver runs in the ApplicationMaster: it needs the same Python.
    # spark-submit's own default deploy mode is client
    deploy_mode = flatten_conf(cfg.require(config, "spark.conf") or {}).get("spark.submit.deployMode", "client")
    if deploy_mode == "cluster":
        spark_conf.setdefault("spark.yarn.appMasterEnv.PYSPARK_PYTHON", python)
    spark_conf.setdefault("spark.executorEnv.PYSPARK_PYTHON", python)
    for key in sorted(spark_conf):
        args += ["--conf", f"{key}={spark_conf[key]}"]
    app_name = cfg.require(config, "spark.app_name")
    if app_name:
        args += ["--name", str(app_name)]
    args.append(job)
    if "--conf-env" not in job_args:  # the job itself must load conf/yarn.yaml too
        args += ["--conf-env", "yarn"]
    return args + list(job_args)


def flatten_conf(conf: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"spark": {"executor": {"instances": 10}}}`` (what ``--set spark.conf.spark.executor.instances=10``
    yields, since --set splits on every dot) -> ``{"spark.executor.instances": 10}``."""
    flat: dict[str, Any] = {}
    for key, value in conf.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_conf(value, name))
        else:
            flat[name] = value
    return flat


def _as_list(value: Any) -> list[str]:
    if not value:
        return []
    if isinstance(value, str):
        return [v for v in value.split(",") if v]
    return [str(v) for v in value]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cxr_pipeline.infra.yarn",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("job", help="job script, e.g. jobs/train_featurizer.py")
    parser.add_argument("job_args", nargs=argparse.REMAINDER, help="-- then the job's own arguments")
    parser.add_argument("--build-wheel", action="store_true", help="build dist/cxr_pipeline-*.whl and ship it")
    add_config_options(parser, spark=False, verbose=False)
    parser.set_defaults(conf_env="yarn")  # the command line is for YARN: conf/yarn.yaml unless told otherwise
    return parser


def _print_command(job: Job) -> int:
    args, config = job.args, job.config
    py_files = None
    if args.build_wheel:
        py_files = [str(build_wheel())]
    elif not cfg.require(config, "yarn.py_files"):
        built = sorted(glob.glob(str(REPO_ROOT / "dist" / "cxr_pipeline-*.whl")))
        py_files = built[-1:] if built else []
    job_args = [a for a in args.job_args if a != "--"]
    print(shlex.join(spark_submit_args(config, args.job, job_args, py_files)))
    return 0


COMMAND = Command("yarn", build_parser, _print_command)


def main(argv: Sequence[str] | None = None) -> int:
    return run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
