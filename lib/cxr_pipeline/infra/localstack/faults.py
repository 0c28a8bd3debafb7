"""Fault injection on a private local stack: kills during real Spark jobs on real HDFS.

``FaultStack`` is an HDFS with 2 DataNodes (replication 2) and a standalone cluster (master +
2 one-core workers), both on free ports under one folder, never the shared 9000/7077 instances.
The faults (used by tests/test_faults.py and bench/bench_faults.py):

- ``kill_python_worker``: SIGKILL one busy PySpark worker process under the cluster's workers;
- ``kill_worker_jvm``: SIGKILL a standalone Worker JVM (its executor exits with it);
- ``stop_datanode``: stop DataNode 1 (the blocks still have a replica on DataNode 0).

``run_featurize_passes`` runs the driver ``cxr_pipeline.spark.featurize_passes`` (N passes of
ImageFeaturizer over a tree, each written as a Parquet table) and fires a fault in chosen passes once the pass's
first task has finished, i.e. in the middle of the pass; a fault that must make a task fail (a
Python worker kill can land on a worker idle between two tasks) is fired again until one has.
``run_training`` runs
jobs/train_featurizer.py under spark-submit and can kill a worker JVM once featurization runs on it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ... import paths
from . import processes
from .hdfs_cluster import LocalHdfs
from .processes import free_port, port_in_use
from .spark_cluster import LocalSparkStandalone

FEATURIZE_JOB_DESCRIPTION = "featurize pass {index}"


# ---------------------------------------------------------------------- process tree
def _proc_stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def descendants(root: int) -> list[int]:
    """All live processes below ``root`` (children, grandchildren, ...)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) and stat[0] != "Z":
            parents[int(entry.name)] = int(stat[1])
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found.extend(children)
        frontier.extend(children)
    return found


def python_workers(roots: list[int]) -> list[int]:
    """PySpark worker processes below ``roots``: the ones pyspark.daemon forked (a python whose parent is python)."""
    workers = []
    for root in roots:
        for pid in descendants(root):
            stat = _proc_stat(pid)
            if stat and processes.process_matches(pid, "python") and processes.process_matches(int(stat[1]), "python"):
                workers.append(pid)
    return workers


def executor_jvms(worker_pid: int) -> list[int]:
    return [pid for pid in descendants(worker_pid) if processes.process_matches(pid, "CoarseGrainedExecutorBackend")]


# The native libraries of featurizer.runtime's choices: a Python worker with one of them mapped is featurizing.
# (With the default onnxruntime, executors never import TensorFlow.)
MODEL_RUNTIME_LIBRARIES = ("tensorflow", "onnxruntime", "openvino")


def model_runtime_loaded(pid: int) -> bool:
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False
    return any(library in maps for library in MODEL_RUNTIME_LIBRARIES)


def _cpu_ticks(pid: int) -> int:
    stat = _proc_stat(pid)
    return int(stat[11]) + int(stat[12]) if stat else -1


def busiest(pids: list[int], window: float = 0.3) -> int | None:
    """The process that used most CPU over ``window`` seconds (the one running a task)."""
    if not pids:
        return None
    before = {pid: _cpu_ticks(pid) for pid in pids}
    time.sleep(window)
    return max(pids, key=lambda pid: _cpu_ticks(pid) - before[pid])


def alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"


# ---------------------------------------------------------------------- the private stack
def _free_port_run(length: int) -> int:
    """A port p with p..p+length-1 all free (the standalone master UI, then one UI port per worker)."""
    for _ in range(50):
        port = free_port()
        if port + length < 65536 and not any(port_in_use(port + i) for i in range(length)):
            processes._handed_out.update(range(port, port + length))
            return port
    raise RuntimeError(f"no run of {length} free TCP ports found")


@dataclass
class FaultStack:
    """A replicated HDFS + a standalone cluster of one-core workers, private to one test run or bench."""

    root: Path
    workers: int = 2
    datanodes: int = 2
    hdfs: LocalHdfs = field(init=False)
    spark: LocalSparkStandalone = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.hdfs = LocalHdfs(
            self.root / "hdfs",
            rpc_port=free_port(),
            http_port=free_port(),
            datanode_ports=tuple(free_port() for _ in range(3 * self.datanodes)),
            heap="256m",
            datanodes=self.datanodes,
        )
        self.spark = LocalSparkStandalone(
            master_port=free_port(),
            web_port=_free_port_run(1 + self.workers),
            workers=self.workers,
            cores=1,
            memory="1g",
            state_dir=self.root / "spark",
        )

    def up(self) -> FaultStack:
        """Both services, started side by side (each takes 10-30 s on a busy 2-core machine)."""
        errors: list[BaseException] = []

        def start(service) -> None:
            try:
                service.up(timeout=180)
            except BaseException as exc:  # noqa: BLE001 - re-raised below in the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(s,)) for s in (self.hdfs, self.spark)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            self.down()
            raise errors[0]
        return self

    def down(self) -> None:
        self.spark.down()
        self.hdfs.down()

    @property
    def master_url(self) -> str:
        return self.spark.master_url

    def worker_pids(self) -> list[int]:
        return [pid for handle in self.spark.workers if handle.alive() and (pid := handle.pid())]

    def config_overrides(self) -> list[str]:
        """``--set`` values that point a job's Python-side storage at this HDFS."""
        return [f"hdfs.namenode_uri={self.hdfs.namenode_uri}", f"hdfs.webhdfs_url={self.hdfs.webhdfs_url}"]

    # -- faults -----------------------------------------------------------------
    def kill_python_worker(self) -> str:
        workers = python_workers(self.worker_pids())
        # The busiest of them all: a task may still be decoding, before it maps a model runtime.
        victim = busiest(workers)
        if victim is None:
            raise RuntimeError("no PySpark worker process is running on the cluster")
        os.kill(victim, signal.SIGKILL)
        return f"SIGKILL Python worker pid {victim}"

    def kill_worker_jvm(self, index: int) -> str:
        handle = self.spark.workers[index]
        pid = handle.pid()
        executors = executor_jvms(pid)
        os.kill(pid, signal.SIGKILL)
        return f"SIGKILL {handle.name} JVM pid {pid} (executor pids {executors})"

    def stop_datanode(self, index: int = 1) -> str:
        handle = self.hdfs.datanodes[index]
        pid = handle.pid()
        handle.stop(timeout=10)
        return f"stopped {handle.name} pid {pid}"

    def featurizing_worker(self) -> int | None:
        """Index of a Spark worker whose executor's Python has a model runtime loaded (featurization runs there)."""
        for index, handle in enumerate(self.spark.workers):
            pid = handle.pid()
            if pid and handle.alive() and any(model_runtime_loaded(p) for p in python_workers([pid])):
                return index
        return None


# ---------------------------------------------------------------------- featurization passes
def _job_env() -> dict[str, str]:
    lib = str(Path(paths.__file__).resolve().parents[1])  # the lib/ this package is imported from
    return {
        **os.environ,
        "PYTHONPATH": f"{lib}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
    }


def _running_jobs(ui_url: str) -> list[dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{ui_url}/api/v1/applications", timeout=2) as response:
            apps = json.load(response)
        if not apps:
            return []
        with urllib.request.urlopen(
            f"{ui_url}/api/v1/applications/{apps[0]['id']}/jobs?status=running", timeout=2
        ) as response:
            return json.load(response)
    except (OSError, ValueError):
        return []


def _half_done_job(ui_url: str, index: int) -> dict[str, Any] | None:
    """Pass ``index``'s featurization job while it has finished a task and has tasks left, else None."""
    wanted = FEATURIZE_JOB_DESCRIPTION.format(index=index)
    for job in _running_jobs(ui_url):
        if job.get("description") == wanted and 1 <= job.get("numCompletedTasks", 0) < job.get("numTasks", 0):
            return job
    return None


@dataclass
class FeaturizeRun:
    returncode: int
    passes: list[dict[str, Any]]  # per pass: index, seconds, failed_tasks, table
    injected: dict[int, str]  # pass -> what was done
    log: str


def run_featurize_passes(
    stack: FaultStack,
    data_uri: str,
    out_dir: Path,
    passes: int,
    faults: dict[int, Callable[[], str]],
    layer: str = "mixed0",
    image_size: int = 96,
    timeout: float = 1800,
    until_a_task_fails: Collection[int] = (),
    refire_after: float = 2.0,
    max_fires: int = 6,
) -> FeaturizeRun:
    """Run the featurize driver on ``stack``; ``faults[i]()`` fires in the middle of pass i.

    For the passes in ``until_a_task_fails`` the fault fires again (``refire_after`` seconds apart, at most
    ``max_fires`` times) while the pass's job still has tasks left and none has failed: a short task can end
    between choosing a victim and killing it, and killing an idle worker tests nothing.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    ui_port = free_port()
    log_path = out_dir / "driver.log"
    command = [
        sys.executable,
        "-m",
        "cxr_pipeline.spark.featurize_passes",
        "--conf-env",
        "standalone",
        "--master",
        stack.master_url,
        "--data",
        data_uri,
        "--out",
        str(out_dir),
        "--passes",
        str(passes),
        "--ui-port",
        str(ui_port),
        "--layer",
        layer,
        "--image-size",
        str(image_size),
        "--job-description",
        FEATURIZE_JOB_DESCRIPTION,
    ]
    pending, injected = dict(faults), {}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=_job_env())
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
        reader.start()
        ui_url = f"http://127.0.0.1:{ui_port}"
        fired: dict[int, list[tuple[float, str]]] = {}  # pass -> (when, what) per firing
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            for index in sorted(pending):
                job = _half_done_job(ui_url, index)
                if job is None or (index in fired and time.monotonic() - fired[index][-1][0] < refire_after):
                    continue
                if index in fired and job.get("numFailedTasks", 0) >= 1:
                    pending.pop(index)  # a firing hit a running task
                    continue
                try:
                    what = pending[index]()
                except RuntimeError:
                    if index not in fired:
                        raise
                    continue  # between a killed worker and its replacement there is none to kill: try again
                fired.setdefault(index, []).append((time.monotonic(), what))
                injected[index] = "; ".join(what for _, what in fired[index])
                if index not in until_a_task_fails or len(fired[index]) >= max_fires:
                    pending.pop(index)
            time.sleep(0.2)
        if process.poll() is None:
            process.kill()
        process.wait()
        reader.join(timeout=10)
    results = [json.loads(line) for line in output if line.startswith("{")]
    return FeaturizeRun(process.returncode, results, injected, log_path.read_text(errors="replace"))


def read_feature_table(table_dir: str | Path) -> dict[str, Any]:
    """``{"paths": [...], "features": {path: ndarray}, "errors": [...]}`` of one pass's Parquet table."""
    import numpy as np
    import pyarrow.parquet as pq

    frame = pq.read_table(str(table_dir)).to_pandas()
    return {
        "paths": list(frame["path"]),
        "features": {p: np.asarray(f, dtype=float) for p, f in zip(frame["path"], frame["features"]) if f is not None},
        "errors": [e for e in frame["featurize_error"] if e is not None],
    }


# ---------------------------------------------------------------------- hdfs-load and checksums
@dataclass
class LoadRun:
    ok: bool
    seconds: float
    injected: str | None
    error: str | None


def run_hdfs_load(
    stack: FaultStack, source: Path, target: str, stop_datanode_after: int | None = None, workers: int = 2
) -> LoadRun:
    """``make hdfs-load``'s code (hdfs_load.load_tree over WebHDFS, what auto picks for a small tree) into
    ``stack``; with ``stop_datanode_after=N`` DataNode 1 is stopped once N files are in place."""
    from .. import hdfs_load

    injected: list[str] = []
    placed: list[Any] = []

    def maybe_stop(placed_file) -> None:
        placed.append(placed_file)
        if len(placed) == stop_datanode_after:
            injected.append(stack.stop_datanode(1))

    started = time.monotonic()
    try:
        report = hdfs_load.load_tree(
            source,
            target,
            via="webhdfs",
            workers=workers,
            webhdfs_url=stack.hdfs.webhdfs_url,
            progress=False,
            on_placed=maybe_stop if stop_datanode_after else None,
        )
        ok, error = report.ok, None
    except Exception as exc:  # noqa: BLE001 - reported, not hidden: the caller asserts on it
        ok, error = False, f"{type(exc).__name__}: {exc}"
    return LoadRun(ok, time.monotonic() - started, injected[0] if injected else None, error)


def checksum_mismatches(source: Path, target: str) -> list[str]:
    """Files of the local tree ``source`` whose MD5 differs in HDFS at ``target`` (or that are missing there)."""
    import hashlib

    from .. import storage

    wanted = {
        p.relative_to(source).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
        for p in source.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }
    bad = []
    for rel, digest in sorted(wanted.items()):
        try:
            got = hashlib.md5(storage.read_bytes(f"{target.rstrip('/')}/{rel}")).hexdigest()
        except Exception as exc:  # noqa: BLE001 - a missing or unreadable file is a mismatch
            got = f"unreadable ({type(exc).__name__})"
        if got != digest:
            bad.append(f"{rel}: {got} != {digest}")
    return bad


# ---------------------------------------------------------------------- the training job
@dataclass
class TrainingRun:
    returncode: int
    seconds: float
    injected: str | None
    killed_executors: list[int]
    stdout: str
    stderr: str


def run_training(
    stack: FaultStack,
    data_uri: str,
    run_dir: Path,
    kill_worker: bool,
    layer: str = "mixed0",
    image_size: int = 96,
    timeout: float = 1800,
) -> TrainingRun:
    """jobs/train_featurizer.py on ``stack``; with ``kill_worker`` a worker JVM is SIGKILLed while it featurizes."""
    command = [
        str(Path(sys.executable).parent / "spark-submit"),
        "--master",
        stack.master_url,
        "--conf",
        "spark.ui.enabled=false",
        "--conf",
        "spark.ui.showConsoleProgress=false",
        str(paths.REPO_ROOT / "jobs" / "train_featurizer.py"),
        "--conf-env",
        "standalone",
        "--data",
        data_uri,
        "--out",
        str(run_dir),
        "--feature-layer",
        layer,
        "--image-size",
        str(image_size),
        "--batch-size",
        "4",
        "--set",
        "tracking.enabled=false",
    ]  # the faults are the subject; MLflow has tests of its own
    for override in stack.config_overrides():
        command += ["--set", override]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_job_env())
    outputs: dict[str, str] = {}
    reader = threading.Thread(
        target=lambda: outputs.update(zip(("stdout", "stderr"), process.communicate())), daemon=True
    )
    reader.start()
    injected, executors = None, []
    deadline = started + timeout
    while kill_worker and injected is None and process.poll() is None and time.monotonic() < deadline:
        index = stack.featurizing_worker()
        if index is not None:
            executors = executor_jvms(stack.spark.workers[index].pid())
            injected = stack.kill_worker_jvm(index)
        time.sleep(0.2)
    reader.join(timeout=max(1.0, deadline - time.monotonic()))
    if process.poll() is None:
        process.kill()
        reader.join(timeout=10)
    return TrainingRun(
        process.wait(),
        time.monotonic() - started,
        injected,
        executors,
        outputs.get("stdout", ""),
        outputs.get("stderr", ""),
    )
