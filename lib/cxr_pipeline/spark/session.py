"""Building the SparkSession from the ``spark`` section of the config."""
from __future__ import annotations

import os
from typing import Any, Mapping

from pyspark.sql import SparkSession


def spark_session(config: Mapping[str, Any] | None = None, app_name: str | None = None, master: str | None = None) -> SparkSession:
    """A SparkSession for ``config["spark"]``; ``master``/``app_name`` override it.

    Under ``spark-submit`` the master given there wins (we do not set it again
    when ``spark.master`` is already in the launcher's conf).
    """
    spark_conf = dict((config or {}).get("spark", {}))
    builder = SparkSession.builder.appName(app_name or spark_conf.get("app_name", "cxr-pipeline"))
    launched_by_submit = "PYSPARK_GATEWAY_PORT" in os.environ or "SPARK_SUBMIT_OPTS" in os.environ
    chosen_master = master or spark_conf.get("master")
    if chosen_master and not (launched_by_submit and master is None):
        builder = builder.master(chosen_master)
    for key, value in (spark_conf.get("conf") or {}).items():
        builder = builder.config(key, str(value))
    return builder.getOrCreate()
