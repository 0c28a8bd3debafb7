"""Building the SparkSession from the ``spark`` section of the config."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from pyspark.sql import SparkSession

from .. import config as cfg

MAX_FAILURES_KEY = "spark.task.maxFailures"
# local, local[4], local[*]: one attempt per task (Spark ignores spark.task.maxFailures in local mode).
_LOCAL_WITHOUT_RETRIES = re.compile(r"local(?:\[(\d+|\*)\])?")
# Settings a local master gets unless the config sets them. spark.locality.wait: local mode has one executor,
# so no task can be more local than another, but delay scheduling still holds back tasks whose preferred host
# (an HDFS DataNode's 127.0.0.1) is not the executor's name while others read cached blocks; local mode
# offers its free cores again only when a task ends, so once nothing runs a held-back stage waits forever.
# Seen as train() hanging at a collect with no task running and both cores free (issue 16).
LOCAL_MASTER_CONF = {"spark.locality.wait": "0s"}


def with_local_retries(master: str | None, max_failures: Any) -> str | None:
    """``local[N]`` -> ``local[N,max_failures]``; other masters (and ``local[N,F]``) unchanged.

    Spark's local mode gives each task exactly one attempt unless the master string
    carries a failure count, so one crashed Python worker would fail the whole job.
    """
    if master is None or max_failures is None:
        return master
    match = _LOCAL_WITHOUT_RETRIES.fullmatch(master.strip())
    if not match:
        return master
    return f"local[{match.group(1) or 1},{int(max_failures)}]"


def _launcher_master() -> str | None:
    """The master spark-submit put in the driver JVM's system properties (it always sets one).

    None when no driver JVM is running yet: starting one here would drop the config's
    driver options (spark.driver.memory), which only apply at JVM launch.
    """
    from pyspark import SparkConf, SparkContext

    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        return None
    SparkContext._ensure_initialized()
    return SparkConf().get("spark.master", None)


def use_project_logging() -> None:
    """Point a JVM that is not started yet at ``conf/spark/log4j2.properties`` (Spark at WARN), unless
    the caller or the cluster chose a SPARK_CONF_DIR. Under spark-submit the JVM is already up:
    the Makefile exports SPARK_CONF_DIR for that."""
    if "PYSPARK_GATEWAY_PORT" in os.environ:
        return
    from .. import paths

    folder = paths.CONF_DIR / "spark"
    if (folder / "log4j2.properties").is_file():
        os.environ.setdefault("SPARK_CONF_DIR", str(folder))


def spark_session(
    config: Mapping[str, Any] | None = None,
    app_name: str | None = None,
    master: str | None = None,
    verbose: bool = False,
) -> SparkSession:
    """A SparkSession for ``config["spark"]`` (None: the process's config); ``master``/``app_name`` override it.

    Under ``spark-submit`` the master given there wins over the config's. Whatever
    its origin, a local master gets ``spark.task.maxFailures`` attempts per task.
    Spark logs at ``spark.log_level`` (``verbose`` = INFO).
    """
    use_project_logging()
    # Python workers run this interpreter (the venv), not whatever `python3` is first on PATH; spark-submit's
    # --conf spark.pyspark.python (YARN: the shipped environment) still wins over the variable.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    config = cfg.default_config() if config is None else config
    spark_conf = dict(cfg.require(config, "spark"))
    settings = dict(spark_conf.get("conf") or {})
    builder = SparkSession.builder.appName(app_name or cfg.require(config, "spark.app_name"))
    launched_by_submit = "PYSPARK_GATEWAY_PORT" in os.environ or "SPARK_SUBMIT_OPTS" in os.environ
    if master is None and launched_by_submit:
        chosen_master = _launcher_master()
    else:
        chosen_master = master or spark_conf.get("master")
    chosen_master = with_local_retries(chosen_master, settings.get(MAX_FAILURES_KEY))
    if chosen_master:
        builder = builder.master(chosen_master)
        if chosen_master.startswith("local"):
            settings = {**LOCAL_MASTER_CONF, **settings}
    for key, value in settings.items():
        builder = builder.config(key, str(value))
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("INFO" if verbose else str(cfg.require(config, "spark.log_level")).upper())
    return session


@contextmanager
def spark_job(
    config: Mapping[str, Any], app_name: str, master: str | None = None, verbose: bool = False
) -> Iterator[SparkSession]:
    """Every Spark job's start-up: storage uses the job's config, the session is built from it and stopped at the end.

    >>> with spark_job(config, "cxr-predict", master=args.master, verbose=args.verbose) as spark:  # doctest: +SKIP
    ...     predict_images(spark, ...)
    """
    from .. import storage

    storage.configure(config)
    spark = spark_session(config, app_name=app_name, master=master, verbose=verbose)
    try:
        yield spark
    finally:
        spark.stop()
