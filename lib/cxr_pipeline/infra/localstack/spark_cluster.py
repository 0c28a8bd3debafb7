"""A Spark standalone cluster on loopback: one Master and N Workers from the pip pyspark.

Each daemon is ``$SPARK_HOME/bin/spark-class <class> ...`` started detached, with
pid and log files under ``paths.SPARK_STATE_DIR``::

    cluster = LocalSparkStandalone(workers=2)
    cluster.up()                # ready when the master's /json shows 2 ALIVE workers
    cluster.master_url          # "spark://127.0.0.1:7077"
    cluster.down()

``worker_conf`` passes ``spark.worker.*`` settings to every Worker (``SPARK_WORKER_OPTS``), e.g. the
GPU resources a worker offers: ``{"spark.worker.resource.gpu.amount": "2",
"spark.worker.resource.gpu.discoveryScript": "/path/discover_gpus.sh"}``.

CLI: ``python -m cxr_pipeline.infra.localstack.spark_cluster up|down|status``.
On 2 cores the executors compete with the driver: keep it down when not in use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ... import paths
from ...cli import Command, Job, add_config_options, run
from .processes import ProcessHandle, describe_port_owner, port_owner, state_lock, wait_for_port_free

MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"


class SparkClusterError(RuntimeError):
    pass


def spark_home() -> Path:
    """The pip pyspark's folder (it is a complete Spark distribution: bin/, jars/)."""
    if os.environ.get("SPARK_HOME") and (Path(os.environ["SPARK_HOME"]) / "bin" / "spark-class").exists():
        return Path(os.environ["SPARK_HOME"])
    try:
        import pyspark
    except ImportError as exc:
        raise SparkClusterError("pyspark is not installed: run `make venv`") from exc
    return Path(pyspark.__file__).parent


class LocalSparkStandalone:
    def __init__(
        self,
        master_port: int = 7077,
        web_port: int = 8080,
        workers: int = 2,
        cores: int = 1,
        memory: str = "1g",
        state_dir: str | os.PathLike = paths.SPARK_STATE_DIR,
        daemon_memory: str = "512m",
        worker_conf: Mapping[str, str] | None = None,
    ):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.master_port = int(master_port)
        self.web_port = int(web_port)
        self.n_workers = int(workers)
        self.cores = int(cores)
        self.memory = memory
        self.state_dir = Path(state_dir).resolve()
        self.daemon_memory = daemon_memory
        self.worker_conf = dict(worker_conf or {})
        self.master = ProcessHandle(
            "master", f"{MASTER_CLASS} --host 127.0.0.1 --port {self.master_port}", self.state_dir
        )
        self.workers = [
            ProcessHandle(f"worker-{i}", f"--work-dir {self._work_dir(i)}", self.state_dir)
            for i in range(self.n_workers)
        ]

    @property
    def master_url(self) -> str:
        return f"spark://127.0.0.1:{self.master_port}"

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def __repr__(self) -> str:
        return f"LocalSparkStandalone({self.master_url}, workers={self.n_workers})"

    def _work_dir(self, index: int) -> Path:
        return self.state_dir / f"work-{index}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            SPARK_HOME=str(spark_home()),
            SPARK_LOCAL_IP="127.0.0.1",
            SPARK_DAEMON_MEMORY=self.daemon_memory,
            SPARK_NO_DAEMONIZE="1",
        )
        if self.worker_conf:
            options = " ".join(f"-D{key}={value}" for key, value in self.worker_conf.items())
            env["SPARK_WORKER_OPTS"] = f"{env.get('SPARK_WORKER_OPTS', '')} {options}".strip()
        env.setdefault("PYSPARK_PYTHON", sys.executable)
        return env

    def _spark_class(self, *args: str) -> list[str]:
        return [str(spark_home() / "bin" / "spark-class"), *args]

    # -- lifecycle -------------------------------------------------------------
    def is_running(self) -> bool:
        return self.master.alive() and all(w.alive() for w in self.workers)

    def up(self, timeout: float = 90) -> LocalSparkStandalone:
        """Start the master and workers (those not running) and wait for N ALIVE workers."""
        with state_lock(self.state_dir):
            if self.is_running() and self.alive_workers() >= self.n_workers:
                return self
            for handle in [self.master, *self.workers]:
                handle.clear_if_stale()
            if not self.master.alive():
                self._check_ports_free()
                self.master.start(
                    self._spark_class(
                        MASTER_CLASS,
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(self.master_port),
                        "--webui-port",
                        str(self.web_port),
                    ),
                    env=self._env(),
                )
            for index, worker in enumerate(self.workers):
                if worker.alive():
                    continue
                self._work_dir(index).mkdir(parents=True, exist_ok=True)
                worker.start(
                    self._spark_class(
                        WORKER_CLASS,
                        "--host",
                        "127.0.0.1",
                        "--cores",
                        str(self.cores),
                        "--memory",
                        self.memory,
                        "--webui-port",
                        str(self.web_port + 1 + index),
                        "--work-dir",
                        str(self._work_dir(index)),
                        self.master_url,
                    ),
                    env=self._env(),
                )
            self._wait_ready(timeout)
            _log(f"standalone Spark up: {self.master_url} with {self.n_workers} workers (UI {self.web_url})")
            return self

    def down(self, timeout: float = 20) -> None:
        with state_lock(self.state_dir):
            # Also workers of an earlier `up --workers N` with a larger N.
            extra = [
                ProcessHandle(p.stem, WORKER_CLASS, self.state_dir)
                for p in sorted(self.state_dir.glob("worker-*.pid"))
                if p.stem not in {w.name for w in self.workers}
            ]
            for handle in [*self.workers, *extra, self.master]:
                handle.stop(timeout)
            wait_for_port_free(self.master_port, timeout=5)

    def master_state(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"{self.web_url}/json", timeout=3) as response:
                return json.load(response)
        except (OSError, ValueError):
            return None

    def alive_workers(self) -> int:
        state = self.master_state()
        if not state:
            return 0
        return sum(1 for worker in state.get("workers", []) if worker.get("state") == "ALIVE")

    def status(self) -> dict[str, Any]:
        alive = self.alive_workers()
        return {
            "master_url": self.master_url,
            "web_url": self.web_url,
            "state_dir": str(self.state_dir),
            "master_pid": self.master.pid() if self.master.alive() else None,
            "worker_pids": [w.pid() if w.alive() else None for w in self.workers],
            "alive_workers": alive,
            "running": self.is_running(),
            "ready": self.is_running() and alive >= self.n_workers,
        }

    # -- helpers ---------------------------------------------------------------
    def _check_ports_free(self) -> None:
        for name, port in (("master", self.master_port), ("master web UI", self.web_port)):
            owner = port_owner(port)
            if owner is not None:
                who = describe_port_owner(owner)
                raise SparkClusterError(
                    f"port {port} ({name}) is in use by {who}: stop it or use --master-port/--web-port"
                )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for handle in [self.master, *self.workers]:
                if not handle.alive():
                    raise SparkClusterError(f"{handle.name} exited during start-up; see {handle.log_file}")
            if self.alive_workers() >= self.n_workers:
                return
            time.sleep(0.5)
        raise SparkClusterError(
            f"standalone cluster not ready after {timeout:.0f} s "
            f"({self.alive_workers()}/{self.n_workers} workers ALIVE); "
            f"logs in {self.state_dir / 'logs'}"
        )


def _log(message: str) -> None:
    print(f"[spark] {message}", file=sys.stderr, flush=True)


def ensure_running(workers: int = 2, timeout: float = 90) -> LocalSparkStandalone:
    """The default cluster (master 7077, ``workers`` one-core workers), started if needed."""
    return LocalSparkStandalone(workers=workers).up(timeout=timeout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cxr_pipeline.infra.localstack.spark_cluster",
        description="Start, stop or inspect a Spark standalone master + workers on 127.0.0.1 (from the pip pyspark).",
    )
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--master-port", type=int, default=7077, help="default: %(default)s")
    parser.add_argument("--web-port", type=int, default=8080, help="master web UI / JSON port (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="number of workers (default: %(default)s)")
    parser.add_argument("--cores", type=int, default=1, help="cores per worker (default: %(default)s)")
    parser.add_argument("--memory", default="1g", help="memory per worker (default: %(default)s)")
    parser.add_argument(
        "--state-dir", type=Path, default=paths.SPARK_STATE_DIR, help="logs/pids/work dirs (default: %(default)s)"
    )
    parser.add_argument("--timeout", type=float, default=90, help="seconds to wait for readiness")
    add_config_options(parser, spark=False, verbose=False)
    return parser


def _act(job: Job) -> int:
    """``up``/``down``, then the status as JSON; ``status`` exits 3 when the cluster is not ready."""
    args = job.args
    cluster = LocalSparkStandalone(
        args.master_port, args.web_port, args.workers, args.cores, args.memory, args.state_dir
    )
    if args.action == "up":
        cluster.up(timeout=args.timeout)
    elif args.action == "down":
        cluster.down()
        _log("standalone Spark stopped")
    status = cluster.status()
    print(json.dumps(status, indent=2))
    return 0 if args.action != "status" or status["ready"] else 3


COMMAND = Command("spark_cluster", build_parser, _act, errors=lambda: (SparkClusterError,))


def main(argv: list[str] | None = None) -> int:
    return run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
