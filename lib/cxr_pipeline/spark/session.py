"""Building the SparkSession from the ``spark`` section of the config."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
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
LOOPBACK = "127.0.0.1"
LOG4J2_FILES = ("log4j2.properties", "log4j2.xml", "log4j2.yaml", "log4j2.json")  # what log4j2 looks for


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


def project_log_config() -> str | None:
    """``conf/spark/log4j2.properties`` (Spark at WARN, short lines), unless SPARK_CONF_DIR holds a log4j2
    configuration of its own: a cluster's logging wins. spark-submit sets SPARK_CONF_DIR to ``$SPARK_HOME/conf``
    when the user did not, and pip's pyspark has no log4j2 file there."""
    from .. import paths

    chosen = os.environ.get("SPARK_CONF_DIR")
    if chosen and any(Path(chosen, name).is_file() for name in LOG4J2_FILES):
        return None
    path = paths.CONF_DIR / "spark" / "log4j2.properties"
    return str(path) if path.is_file() else None


def use_project_logging() -> str | None:
    """Point a JVM that is not started yet at the project's log4j2 settings (:func:`project_log_config`) through
    SPARK_CONF_DIR, when the caller chose none. Returns the settings a JVM did not start with, which
    :func:`spark_session` loads once the session exists: under spark-submit (its JVM is already up), or when
    SPARK_CONF_DIR names a folder without a log4j2 file."""
    config = project_log_config()
    if config is not None and "PYSPARK_GATEWAY_PORT" not in os.environ and not os.environ.get("SPARK_CONF_DIR"):
        os.environ["SPARK_CONF_DIR"] = os.path.dirname(config)
        return None
    return config


def _reconfigure_running_jvm(session: SparkSession, config: str) -> None:
    """The running JVM's log4j2, reloaded from ``config``. Only once the session exists: starting a SparkContext
    re-initialises Spark's logging, which would undo it."""
    jvm = session.sparkContext._jvm
    jvm.org.apache.logging.log4j.core.config.Configurator.reconfigure(jvm.java.io.File(config).toURI())


def _loopback_conf(chose_address: bool) -> dict[str, str]:
    """A local master's driver binds to (and names itself by) the loopback address unless the user chose one
    (SPARK_LOCAL_IP / SPARK_LOCAL_HOSTNAME). Left to Spark, a host name that resolves to 127.0.0.1 makes it
    pick another interface ("resolves to a loopback address; using 192.0.2.2 instead")."""
    return {} if chose_address else {"spark.driver.host": LOOPBACK, "spark.driver.bindAddress": LOOPBACK}


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
    late_log_config = use_project_logging()
    # Python workers run this interpreter (the venv), not whatever `python3` is first on PATH; spark-submit's
    # --conf spark.pyspark.python (YARN: the shipped environment) still wins over the variable.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    chose_address = any(os.environ.get(name) for name in ("SPARK_LOCAL_IP", "SPARK_LOCAL_HOSTNAME"))
    os.environ.setdefault("SPARK_LOCAL_IP", LOOPBACK)
    config = cfg.default_config() if config is None else config
    spark_conf = dict(cfg.require(config, "spark"))
    level = "INFO" if verbose else str(cfg.require(config, "spark.log_level")).upper()
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
            settings = {**LOCAL_MASTER_CONF, **_loopback_conf(chose_address), **settings}
    if late_log_config is not None:
        settings.setdefault("spark.log.level", level)  # the start-up's INFO lines, before the reconfiguration below
    for key, value in settings.items():
        builder = builder.config(key, str(value))
    session = builder.getOrCreate()
    if late_log_config is not None:
        _reconfigure_running_jvm(session, late_log_config)
    session.sparkContext.setLogLevel(level)
    return session
