"""Shared fixtures: a real local Spark session and the real local HDFS.

The HDFS fixture starts the project's single-node HDFS (NameNode + DataNode on
127.0.0.1) if it is not already up, and stops at the end what it started (an HDFS
it found running stays up); each test gets its own folder under /tests/<uuid> and
removes it afterwards.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Jobs run by the tests log to MLflow like a user's do, but into a store of this test session,
# never into the checkout's .local/mlflow (test_tracking uses stores of its own).
_MLFLOW_STORE = Path(tempfile.mkdtemp(prefix="cxr-tests-mlflow-"))
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_MLFLOW_STORE}/mlflow.db"

from cxr_pipeline import paths  # noqa: E402
from cxr_pipeline.spark.session import LOCAL_MASTER_CONF  # noqa: E402


@pytest.fixture(scope="session")
def sample_tree() -> Path:
    tree = paths.SAMPLE_TREE
    if not (tree / "train").is_dir():
        pytest.fail(f"sample tree missing at {tree}: run `make sample-data` (make test does it)")
    return tree


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("cxr-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "16")
        .config("spark.driver.memory", "2g")
        .config("spark.python.worker.reuse", "true")
        .config("spark.locality.wait", LOCAL_MASTER_CONF["spark.locality.wait"])  # why: spark/session.py
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def hdfs_cluster():
    """The real local HDFS, started on demand (make hdfs-up does the same) and stopped after the session
    if this session started it; its daemons that were already running are left alone."""
    from cxr_pipeline.infra.localstack.hdfs_cluster import default_instance

    with default_instance().running() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def spark_standalone():
    """Master URL of the loopback standalone cluster (2 one-core workers).

    Started on demand and stopped after the session if this session started it
    (its three JVMs compete for the 2 cores); left alone if it was already up.
    """
    from cxr_pipeline.infra.localstack.spark_cluster import LocalSparkStandalone

    cluster = LocalSparkStandalone(workers=2)
    was_running = cluster.is_running()
    cluster.up()
    yield cluster.master_url
    if not was_running:
        cluster.down()


@pytest.fixture
def hdfs_tmp(hdfs_cluster):
    """A fresh hdfs:// folder URI for one test, removed afterwards."""
    from cxr_pipeline.infra import storage

    uri = f"{hdfs_cluster.namenode_uri}/tests/{uuid.uuid4().hex[:12]}"
    storage.makedirs(uri)
    yield uri
    storage.delete(uri, recursive=True)


@pytest.fixture(scope="session")
def sample_in_hdfs(hdfs_cluster, sample_tree):
    """``(base, data)``: the sample tree in HDFS and a feature-cache root, fixed for this pytest process (so the
    prediction tests reuse the features). Removed before the HDFS fixture stops the HDFS it may have started."""
    from cxr_pipeline.infra import storage

    base = f"{hdfs_cluster.namenode_uri}/tests/cxr-train-{os.getpid()}"
    data = f"{base}/chest_xray"
    storage.upload_dir(str(sample_tree), data)
    yield base, data
    storage.delete(base, recursive=True)


@pytest.fixture(scope="session")
def sample_run(spark, sample_in_hdfs):
    """``(base, data, TrainingResult)``: ONE training run of the sample tree in the real HDFS, shared by
    the training, prediction and integrity tests (each used to train its own identical run)."""
    from test_training import train_on_sample

    base, data = sample_in_hdfs
    return base, data, train_on_sample(spark, base, data, "run_default")
