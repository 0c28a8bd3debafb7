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

import numpy as np
import pytest
from tolerances import assert_same_features

from cxr_pipeline.config import get, load_config
from cxr_pipeline.infra import storage
from cxr_pipeline.infra.localstack import faults
from cxr_pipeline.spark.session import MAX_FAILURES_KEY, with_local_retries

REPO = Path(__file__).resolve().parents[1]


def job_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'lib'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
    }


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
    print("LOCALITY_WAIT", spark.conf.get("spark.locality.wait"))
    print("RESULT", sum(spark.sparkContext.parallelize(range(10), 2).map(crash_first_attempt).collect()))
    spark.stop()
    """
)


@pytest.mark.slow
def test_a_crashed_python_worker_is_retried_under_spark_submit_local_master(tmp_path):
    """`spark-submit --master local[2]` (the Makefile's demo) survives one killed Python worker."""
    script = tmp_path / "crash_once.py"
    script.write_text(CRASH_ONCE_JOB)
    marker = tmp_path / "crashed"
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "spark-submit"),
            "--master",
            "local[2]",
            "--conf",
            "spark.ui.enabled=false",
            str(script),
            str(marker),
        ],
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert marker.exists(), "the job never crashed a worker: the test proves nothing"
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"MASTER local[2,{configured_attempts()}]" in done.stdout
    assert "LOCALITY_WAIT 0s" in done.stdout  # no delay scheduling on one executor (spark/session.py)
    assert "RESULT 285" in done.stdout


# ------------------------------------------------------------------ kills on a private cluster + 2-DataNode HDFS
FEATURE_LAYER, IMAGE_SIZE = "mixed0", 75  # cheap: the smallest InceptionV3 input, its first block
# Above pytest.ini's 900 s: on the shared 2-core machine under load ~25 the stack start-up plus three featurization
# passes took 630 s and the training job 580 s.
CLUSTER_TEST_TIMEOUT_S = 1800


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory, sample_tree):
    """A private HDFS (2 DataNodes, replication 2) + standalone cluster (master, 2 one-core workers), holding
    the sample tree."""
    stack = faults.FaultStack(tmp_path_factory.mktemp("fault-stack")).up()
    try:
        data = f"{stack.hdfs.namenode_uri}/data/chest_xray"
        storage.upload_dir(str(sample_tree), data)
        yield stack, data
    finally:
        stack.down()


@pytest.fixture(scope="module")
def featurize_passes(fault_stack, tmp_path_factory):
    """One driver, three featurization passes: undisturbed, a Python worker SIGKILLed, DataNode 1 stopped."""
    stack, data = fault_stack
    run = faults.run_featurize_passes(
        stack,
        data,
        tmp_path_factory.mktemp("features"),
        passes=3,
        faults={1: stack.kill_python_worker, 2: stack.stop_datanode},
        layer=FEATURE_LAYER,
        image_size=IMAGE_SIZE,
        until_a_task_fails={1},
    )
    stack.hdfs.up()  # DataNode 1 back for the next tests
    assert run.returncode == 0, run.log[-4000:]
    return run


def assert_same_table(got: dict, reference: dict) -> None:
    assert len(got["paths"]) == len(set(got["paths"])), "duplicate rows"
    assert sorted(got["paths"]) == sorted(reference["paths"])
    assert not got["errors"]
    for path, vector in reference["features"].items():
        assert_same_features(got["features"][path], vector)


@pytest.mark.slow
@pytest.mark.hdfs
@pytest.mark.cluster
@pytest.mark.timeout(CLUSTER_TEST_TIMEOUT_S)
def test_python_worker_killed_mid_featurization_gives_the_same_table(featurize_passes, sample_tree):
    undisturbed, killed = featurize_passes.passes[0], featurize_passes.passes[1]
    assert featurize_passes.injected[1].startswith("SIGKILL Python worker")
    assert killed["failed_tasks"] >= 1, f"no kill hit a running task: {featurize_passes.injected[1]}"
    reference = faults.read_feature_table(undisturbed["table"])
    assert len(reference["paths"]) == len(list(sample_tree.rglob("*.jpeg"))) and not reference["errors"]
    assert_same_table(faults.read_feature_table(killed["table"]), reference)


@pytest.mark.slow
@pytest.mark.hdfs
@pytest.mark.cluster
@pytest.mark.timeout(CLUSTER_TEST_TIMEOUT_S)
def test_featurizing_on_the_cluster_from_hdfs_equals_plain_keras(featurize_passes, sample_tree):
    """The undisturbed pass (2 workers reading the private HDFS) gives bare Keras' features for the same files."""
    from cxr_pipeline.images.decode import decode_image
    from cxr_pipeline.models.backbones import build_backbone, featurize_arrays
    from cxr_pipeline.spark.featurizer import FeaturizerSettings

    table = faults.read_feature_table(featurize_passes.passes[0]["table"])
    files = [sample_tree / "/".join(path.split("/")[-3:]) for path in table["paths"]]
    model = build_backbone("InceptionV3", feature_layer=FEATURE_LAYER, image_size=IMAGE_SIZE)
    intensity = FeaturizerSettings.defaults().intensity  # the featurizer's default decoding
    batch = [decode_image(f.read_bytes(), (IMAGE_SIZE, IMAGE_SIZE), intensity=intensity) for f in files]
    expected = featurize_arrays(model, "InceptionV3", np.stack(batch), batch_size=len(batch))
    assert_same_features(np.stack([table["features"][path] for path in table["paths"]]), expected)


@pytest.mark.slow
@pytest.mark.hdfs
@pytest.mark.cluster
@pytest.mark.timeout(CLUSTER_TEST_TIMEOUT_S)
def test_datanode_stopped_while_featurization_reads(featurize_passes, fault_stack, sample_tree):
    stack, data = fault_stack
    assert featurize_passes.injected[2].startswith("stopped datanode-1")
    reference = faults.read_feature_table(featurize_passes.passes[0]["table"])
    assert_same_table(faults.read_feature_table(featurize_passes.passes[2]["table"]), reference)
    assert faults.checksum_mismatches(sample_tree, data) == []


@pytest.mark.slow
@pytest.mark.hdfs
def test_datanode_stopped_while_hdfs_load_writes(fault_stack, sample_tree):
    stack, _ = fault_stack
    target = f"{stack.hdfs.namenode_uri}/loads/chest_xray"
    try:
        run = faults.run_hdfs_load(stack, sample_tree, target, stop_datanode_after=4)
        assert run.injected and run.injected.startswith("stopped datanode-1")
        assert run.ok, run.error
        assert faults.checksum_mismatches(sample_tree, target) == []
    finally:
        stack.hdfs.up()


@pytest.mark.slow
@pytest.mark.hdfs
@pytest.mark.cluster
@pytest.mark.timeout(CLUSTER_TEST_TIMEOUT_S)
def test_worker_jvm_killed_mid_training_job_completes_on_the_other_worker(fault_stack, tmp_path):
    stack, data = fault_stack
    run = faults.run_training(
        stack, data, tmp_path / "run", kill_worker=True, layer=FEATURE_LAYER, image_size=IMAGE_SIZE
    )
    assert run.injected and "JVM" in run.injected, "no worker was featurizing: nothing was killed"
    assert run.returncode == 0, run.stderr[-4000:]
    assert (tmp_path / "run" / "metrics.json").exists() and "training summary" in run.stdout
    assert run.killed_executors and not any(faults.alive(pid) for pid in run.killed_executors)
    assert len(stack.worker_pids()) == 1  # it finished with one worker left
