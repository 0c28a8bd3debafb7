"""The project's local infrastructure: Hadoop provisioning, the real HDFS, the standalone Spark cluster."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cxr_pipeline.infra import storage
from cxr_pipeline.infra.localstack import provision
from cxr_pipeline.infra.localstack.hdfs_cluster import HdfsClusterError, LocalHdfs
from cxr_pipeline.infra.localstack.processes import ProcessHandle, free_port, port_in_use

REPO = Path(__file__).resolve().parents[1]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


# ------------------------------------------------------------------ provisioning
def test_jar_selection_leaves_out_spark_hive_scala_and_jersey2():
    assert provision.is_wanted_jar("hadoop-hdfs-2.7.3.jar")
    assert provision.is_wanted_jar("guava-14.0.1.jar")
    for unwanted in (
        "spark-core_2.11-2.4.8.jar",
        "hive-exec-1.2.1.spark2.jar",
        "scala-library-2.11.12.jar",
        "jersey-server-2.22.2.jar",
        "javax.ws.rs-api-2.0.1.jar",
        "hk2-api-2.4.0-b34.jar",
        "json4s-core_2.11-3.5.3.jar",
        "README.txt",
    ):
        assert not provision.is_wanted_jar(unwanted), unwanted


def test_unprovisioned_hadoop_home_says_run_make_hadoop(tmp_path):
    with pytest.raises(provision.ProvisionError, match="make hadoop"):
        provision.read_classpath(tmp_path / "nothing-here")


def test_provisioned_classpath_has_the_hdfs_server_and_jersey1():
    classpath = provision.read_classpath().split(os.pathsep)
    names = {Path(entry).name for entry in classpath}
    assert {"hadoop-hdfs-2.7.3.jar", "hadoop-common-2.7.3.jar", "jersey1-server.jar", "jsr311-api-1.1.1.jar"} <= names
    assert all(Path(entry).exists() for entry in classpath)
    assert (Path(classpath[0]) / "webapps" / "hdfs").is_dir()
    assert not any(name.startswith(("spark-", "hive-", "scala-")) for name in names)


# --------------------------------------------------------------------- the HDFS
@pytest.mark.hdfs
def test_up_is_idempotent_and_status_reports_ready(hdfs_cluster):
    before = hdfs_cluster.status()
    assert before["ready"] and before["live_datanodes"] >= 1 and before["safemode"] is False
    again = LocalHdfs().up(timeout=30)
    after = again.status()
    assert (after["namenode_pid"], after["datanode_pid"]) == (before["namenode_pid"], before["datanode_pid"])
    assert again.namenode_uri == "hdfs://127.0.0.1:9000"
    assert again.webhdfs_url == "http://127.0.0.1:9870"


@pytest.mark.hdfs
def test_cli_status_prints_json(hdfs_cluster):
    result = subprocess.run(
        [sys.executable, "-m", "cxr_pipeline.infra.localstack.hdfs_cluster", "status"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "lib")},
    )
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["ready"] is True and status["namenode_uri"] == hdfs_cluster.namenode_uri


@pytest.mark.hdfs
def test_hdfs_script_put_ls_cat_round_trip(hdfs_tmp, tmp_path):
    local = tmp_path / "x-ray.bin"
    local.write_bytes(os.urandom(70_000))
    dfs = storage.hdfs_dfs_command()
    assert Path(dfs[0]) == REPO / "scripts" / "hdfs"

    target = f"{hdfs_tmp}/via-fsshell"
    subprocess.run([*dfs, "-mkdir", "-p", target], check=True)
    subprocess.run([*dfs, "-put", str(local), f"{target}/"], check=True)
    listing = subprocess.run([*dfs, "-ls", target], check=True, capture_output=True, text=True).stdout
    assert "x-ray.bin" in listing and " 70000 " in listing
    cat = subprocess.run([*dfs, "-cat", f"{target}/x-ray.bin"], check=True, capture_output=True).stdout
    assert cat == local.read_bytes()
    # FsShell and WebHDFS see the same namespace.
    assert storage.read_bytes(f"{target}/x-ray.bin") == local.read_bytes()


def test_port_in_use_is_reported_with_its_owner(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        others = free_ports(4)
        hdfs = LocalHdfs(tmp_path / "hdfs", rpc_port=port, http_port=others[0], datanode_ports=tuple(others[1:]))
        with pytest.raises(HdfsClusterError, match=rf"port {port} .*in use by pid {os.getpid()}"):
            hdfs.up(timeout=5)
    assert not hdfs.is_formatted()  # refused before touching anything


def test_stale_pid_file_is_not_a_running_daemon(tmp_path):
    handle = ProcessHandle("namenode", "org.apache.hadoop.hdfs.server.namenode.NameNode", tmp_path)
    handle.pid_file.write_text(f"{dead_pid()}\n")
    assert not handle.alive()
    assert handle.clear_if_stale() and not handle.pid_file.exists()
    # A live pid that belongs to some other program is not ours either.
    handle.pid_file.write_text(f"{os.getpid()}\n")
    assert not handle.alive()


def test_a_daemon_in_the_middle_of_exec_is_still_alive(tmp_path):
    """spark-class is a shell script that ``exec``s java, and while the kernel swaps the program in,
    ``/proc/<pid>/cmdline`` reads empty. A fresh clone's CI run once took that instant for "worker exited
    during start-up" and tore the cluster down. Here a process exec's itself a thousand times, the
    marker in every command line, and it must never look dead."""
    marker = "cxr-exec-race-marker"
    script = tmp_path / "exec_loop.sh"
    script.write_text(
        '#!/bin/sh\n[ "$1" -gt 0 ] || exec /bin/sh -c "sleep 0.2" "$2"\nexec /bin/sh "$0" $(($1 - 1)) "$2"\n'
    )
    process = subprocess.Popen(["/bin/sh", str(script), "1000", marker])
    handle = ProcessHandle("looper", marker, tmp_path)
    handle.pid_file.write_text(f"{process.pid}\n")
    checks, looked_dead = 0, 0
    while process.poll() is None:
        checks += 1
        if not handle.alive() and process.poll() is None:
            looked_dead += 1
    assert checks > 100, "the exec loop ended before it could be watched"
    assert looked_dead == 0, f"{looked_dead} of {checks} checks took a live, exec'ing daemon for dead"


def test_default_layout_has_one_datanode_and_one_replica(tmp_path):
    hdfs = LocalHdfs(tmp_path / "hdfs")
    hdfs.write_config()
    assert len(hdfs.datanodes) == 1 and hdfs.replication == 1
    assert "<name>dfs.replication</name><value>1</value>" in (hdfs.conf_dir / "hdfs-site.xml").read_text()


def test_replicated_layout_renders_two_datanodes_with_their_own_ports_and_data_dirs(tmp_path):
    hdfs = LocalHdfs(
        tmp_path / "hdfs", rpc_port=19000, http_port=19870, datanode_ports=(19866, 19864, 19867), datanodes=2
    )
    hdfs.write_config()
    assert "<name>dfs.replication</name><value>2</value>" in (hdfs.conf_dir / "hdfs-site.xml").read_text()
    assert [h.name for h in hdfs.datanodes] == ["datanode", "datanode-1"]
    second = " ".join(hdfs.datanode_command(1))
    assert f"dfs.datanode.data.dir=file://{hdfs.state_dir / 'data-1'}" in second
    assert all(f"127.0.0.1:{port}" in second for port in (19876, 19874, 19877))
    assert "-D" not in hdfs.datanode_command(0)  # DataNode 0 runs on the rendered hdfs-site.xml
    assert {19866, 19876} <= set(hdfs.all_ports.values())
    with pytest.raises(ValueError, match="datanode_ports"):
        LocalHdfs(tmp_path / "bad", datanode_ports=(1, 2, 3, 4), datanodes=2)


@pytest.mark.hdfs
@pytest.mark.slow
def test_second_instance_on_other_ports_with_stale_pids_and_a_crash(hdfs_cluster, tmp_path):
    """A second, independent HDFS: started over stale pid files, survives a DataNode crash, stops cleanly."""
    rpc, http, data, data_http, data_ipc = free_ports(5)
    hdfs = LocalHdfs(tmp_path / "hdfs2", rpc_port=rpc, http_port=http, datanode_ports=(data, data_http, data_ipc))
    hdfs.state_dir.mkdir(parents=True)
    hdfs.namenode.pid_file.write_text(f"{dead_pid()}\n")
    hdfs.datanode.pid_file.write_text(f"{dead_pid()}\n")
    assert not hdfs.is_running()
    try:
        hdfs.up(timeout=90)
        status = hdfs.status()
        assert status["ready"] and status["namenode_uri"] == f"hdfs://127.0.0.1:{rpc}"
        assert (hdfs.state_dir / "name" / "current" / "VERSION").exists()
        assert f"127.0.0.1:{rpc}" in (hdfs.conf_dir / "core-site.xml").read_text()

        # Its namespace is its own: storage routes hdfs://127.0.0.1:<rpc> to its WebHDFS.
        uri = f"{hdfs.namenode_uri}/only-here/f.bin"
        storage.write_bytes(uri, b"second instance")
        assert storage.read_bytes(uri) == b"second instance"
        assert not storage.exists(f"{hdfs_cluster.namenode_uri}/only-here/f.bin")
        dfs = storage.hdfs_dfs_command()
        listing = subprocess.run(
            [*dfs, "-ls", "-R", "/"],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "HADOOP_CONF_DIR": str(hdfs.conf_dir)},
        ).stdout
        assert "/only-here/f.bin" in listing

        # A crashed DataNode leaves a stale pid file; `up` notices and restarts just that one.
        namenode_pid, datanode_pid = hdfs.namenode.pid(), hdfs.datanode.pid()
        os.kill(datanode_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while hdfs.datanode.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not hdfs.is_running()
        hdfs.up(timeout=90)
        assert hdfs.namenode.pid() == namenode_pid and hdfs.datanode.pid() != datanode_pid
        assert storage.read_bytes(uri) == b"second instance"  # the data survived
    finally:
        hdfs.down()
    assert not hdfs.is_running()
    assert not hdfs.namenode.pid_file.exists() and not hdfs.datanode.pid_file.exists()
    assert not any(port_in_use(p) for p in (rpc, http, data, data_http, data_ipc))
    assert hdfs.status()["ready"] is False


@pytest.mark.hdfs
@pytest.mark.slow
def test_running_stops_only_the_daemons_it_started(tmp_path):
    """The tests' hdfs_cluster fixture: what it found running stays up, what it started stops. On an HDFS of
    its own (other ports and state dir), so the shared one on 9000 is never touched."""
    rpc, http, *datanode_ports = (free_port() for _ in range(5))

    def instance() -> LocalHdfs:
        return LocalHdfs(tmp_path / "hdfs", rpc_port=rpc, http_port=http, datanode_ports=tuple(datanode_ports))

    theirs = instance()  # someone else's `make hdfs-up` / `make hdfs-down` on the same HDFS
    try:
        with instance().running() as hdfs:  # nothing running: both daemons started, and stopped at the end
            assert sorted(hdfs.started) == ["datanode", "namenode"] and hdfs.status()["ready"]
            storage.write_bytes(f"{hdfs.namenode_uri}/f.bin", b"x")
        assert not theirs.namenode.alive() and not theirs.datanode.alive()
        assert not any(port_in_use(port) for port in (rpc, http, *datanode_ports))

        theirs.up()  # found running: left running, under the same pids
        pids = (theirs.namenode.pid(), theirs.datanode.pid())
        with instance().running() as hdfs:
            assert hdfs.started == {}
        assert theirs.status()["ready"] and (theirs.namenode.pid(), theirs.datanode.pid()) == pids

        theirs.datanode.stop()  # only the NameNode found running: the DataNode alone is started and stopped
        with instance().running() as hdfs:
            assert list(hdfs.started) == ["datanode"] and hdfs.status()["ready"]
        assert theirs.namenode.alive() and theirs.namenode.pid() == pids[0] and not theirs.datanode.alive()

        theirs.namenode.stop()  # started by the block, then restarted by someone else meanwhile: theirs now
        with instance().running() as hdfs:
            assert sorted(hdfs.started) == ["datanode", "namenode"]
            theirs.down()
            theirs.up()
        assert theirs.is_running() and theirs.status()["ready"]
    finally:
        theirs.down()
    assert not any(port_in_use(port) for port in (rpc, http, *datanode_ports))


# ---------------------------------------------------------- standalone Spark cluster
TINY_JOB = textwrap.dedent("""
    import json, sys
    from pyspark.sql import SparkSession
    master, data_uri = sys.argv[1], sys.argv[2]
    spark = (SparkSession.builder.master(master).appName("cxr-standalone-smoke")
             .config("spark.executor.memory", "512m").config("spark.cores.max", "2")
             .config("spark.ui.enabled", "false").getOrCreate())
    sc = spark.sparkContext
    total = sc.parallelize(range(1000), 4).map(lambda x: x * x).sum()
    rows = spark.read.format("binaryFile").load(data_uri).select("path", "content").collect()
    executors = sc._jsc.sc().getExecutorMemoryStatus().size() - 1  # minus the driver
    print("RESULT " + json.dumps({"total": total, "executors": executors,
                                  "files": {r.path: bytes(r.content).hex() for r in rows}}))
    spark.stop()
""")


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.hdfs
def test_standalone_cluster_runs_a_job_reading_hdfs(spark_standalone, hdfs_tmp, tmp_path):
    from cxr_pipeline.infra.localstack.spark_cluster import LocalSparkStandalone

    cluster = LocalSparkStandalone(workers=2)
    assert spark_standalone == cluster.master_url == "spark://127.0.0.1:7077"
    assert cluster.alive_workers() == 2 and cluster.status()["ready"]

    payload = os.urandom(3000)
    storage.write_bytes(f"{hdfs_tmp}/one.bin", payload)
    script = tmp_path / "tiny_job.py"
    script.write_text(TINY_JOB)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "lib"),
        "PYSPARK_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
    }
    result = subprocess.run(
        [sys.executable, str(script), spark_standalone, hdfs_tmp], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(text for text in result.stdout.splitlines() if text.startswith("RESULT "))
    outcome = json.loads(line[len("RESULT ") :])
    assert outcome["total"] == sum(x * x for x in range(1000))
    assert outcome["executors"] >= 1
    assert outcome["files"] == {f"{hdfs_tmp}/one.bin": payload.hex()}
    finished = [app["name"] for app in cluster.master_state().get("completedapps", [])]
    assert "cxr-standalone-smoke" in finished
