"""Fault tolerance: task retries in local mode, killed Python workers and worker JVMs on a standalone
cluster, a DataNode stopped on a 2-DataNode HDFS while Spark reads and while hdfs-load writes.

The kills hit a private HDFS and standalone cluster on free ports (never the shared 9000/7077 ones),
started once for the module (`fault_stack`).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cxr_pipeline.config import get, load_config
from cxr_pipeline.spark.session import MAX_FAILURES_KEY, with_local_retries

REPO = Path(__file__).resolve().parents[1]


def job_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO / 'lib'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}


# ------------------------------------------------------------------ retries in local mode
def test_local_masters_get_the_configured_attempts():
    assert with_local_retries("local[2]", "4") == "local[2,4]"
    assert with_local_retries("local", 3) == "local[1,3]"
    assert with_local_retries("local[*]", 2) == "local[*,2]"
    assert with_local_retries("local[2,7]", 4) == "local[2,7]"  # an explicit count is kept
    assert with_local_retries("spark://127.0.0.1:7077", 4) == "spark://127.0.0.1:7077"  # spark.task.maxFailures applies
    assert with_local_retries("local[2]", None) == "local[2]"


def configured_attempts() -> int:
    return int(get(load_config("local"), "spark.conf")[MAX_FAILURES_KEY])


def test_defaults_retry_tasks():
    assert configured_attempts() >= 2


CRASH_ONCE_JOB = textwrap.dedent(
    """
    import os, signal, sys
    from cxr_pipeline.config import load_config
    from cxr_pipeline.spark.session import spark_session

    marker = sys.argv[1]

    def crash_first_attempt(x):
        try:  # exactly one task, on its first attempt, loses its Python worker
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            os.kill(os.getpid(), signal.SIGKILL)
        except FileExistsError:
            pass
        return x * x

    spark = spark_session(load_config("local"), app_name="cxr-crash-once")
    spark.sparkContext.setLogLevel("ERROR")
    print("MASTER", spark.sparkContext.master)
    print("RESULT", sum(spark.sparkContext.parallelize(range(10), 2).map(crash_first_attempt).collect()))
    spark.stop()
    """
)


def test_a_crashed_python_worker_is_retried_under_spark_submit_local_master(tmp_path):
    """`spark-submit --master local[2]` (the Makefile's demo) survives one killed Python worker."""
    script = tmp_path / "crash_once.py"
    script.write_text(CRASH_ONCE_JOB)
    marker = tmp_path / "crashed"
    done = subprocess.run([str(Path(sys.executable).parent / "spark-submit"), "--master", "local[2]",
                           "--conf", "spark.ui.enabled=false", str(script), str(marker)],
                          env=job_env(), capture_output=True, text=True, timeout=300)
    assert marker.exists(), "the job never crashed a worker: the test proves nothing"
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"MASTER local[2,{configured_attempts()}]" in done.stdout
    assert "RESULT 285" in done.stdout
