"""A real Apache HDFS (NameNode + one or more DataNodes) on 127.0.0.1.

Runs the Hadoop 2.7.3 jars that ``make hadoop`` provisions (see ``provision``)
as detached ``java`` processes whose pid and log files live in the
instance's state dir, next to its name/data dirs and its rendered config::

    hdfs = LocalHdfs()          # the default instance: RPC 9000, WebHDFS 9870, one DataNode
    hdfs.up()                   # formats on first use; a no-op when already up
    hdfs.namenode_uri           # "hdfs://127.0.0.1:9000"
    hdfs.down()

    with LocalHdfs().running():  # up for the block, then stops only the daemons it started (the tests do)
        ...

``LocalHdfs(..., datanodes=2)`` is the replicated layout: two DataNodes (data dirs
``data`` and ``data-1``) and replication 2, so either DataNode can stop without
losing a block. CLI: ``python -m cxr_pipeline.infra.localstack.hdfs_cluster up|down|status [--datanodes 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ... import paths
from ...cli import Command, Job, UsageError, add_config_options, run
from .. import storage
from . import provision
from .processes import ProcessHandle, describe_port_owner, port_owner, state_lock, wait_for_port_free

NAMENODE_CLASS = "org.apache.hadoop.hdfs.server.namenode.NameNode"
DATANODE_CLASS = "org.apache.hadoop.hdfs.server.datanode.DataNode"
BLOCK_REPORT_SENT = b"Successfully sent block report"
MAX_DATANODES = 3
CONFIG_TEMPLATES = ("core-site.xml", "hdfs-site.xml")
LOG4J_PROPERTIES = """\
hadoop.root.logger=INFO,console
log4j.rootLogger=${hadoop.root.logger}
log4j.appender.console=org.apache.log4j.ConsoleAppender
log4j.appender.console.target=System.err
log4j.appender.console.layout=org.apache.log4j.PatternLayout
log4j.appender.console.layout.ConversionPattern=%d{ISO8601} %p %c{2}: %m%n
log4j.logger.org.apache.hadoop.util.NativeCodeLoader=ERROR
# One line per block/file operation otherwise: the logs would grow without bound.
log4j.logger.org.apache.hadoop.hdfs.server.namenode.FSNamesystem.audit=WARN
log4j.logger.org.apache.hadoop.hdfs.server.datanode.DataNode.clienttrace=WARN
log4j.logger.org.apache.hadoop.hdfs.StateChange=WARN
log4j.logger.BlockStateChange=WARN
"""


class HdfsClusterError(RuntimeError):
    pass


class LocalHdfs:
    """One local HDFS instance; several can run side by side on different ports/state dirs."""

    def __init__(
        self,
        state_dir: str | os.PathLike = paths.HDFS_STATE_DIR,
        rpc_port: int = 9000,
        http_port: int = 9870,
        datanode_ports: tuple[int, ...] = (9866, 9864, 9867),
        hadoop_home: str | os.PathLike = paths.HADOOP_HOME,
        heap: str = "512m",
        datanodes: int = 1,
    ):
        """``datanode_ports``: (data transfer, http, ipc) for each DataNode, flat; when only the
        first DataNode's three are given, DataNode i uses them + 10*i."""
        if not 1 <= datanodes <= MAX_DATANODES:
            raise ValueError(f"datanodes must be 1..{MAX_DATANODES}")
        self.state_dir = Path(state_dir).resolve()
        self.rpc_port = int(rpc_port)
        self.http_port = int(http_port)
        self.datanode_port_sets = _datanode_port_sets([int(p) for p in datanode_ports], datanodes)
        self.datanode_ports = self.datanode_port_sets[0]
        self.replication = datanodes
        self.hadoop_home = Path(hadoop_home)
        self.heap = heap
        self.conf_dir = self.state_dir / "conf"
        self.namenode = ProcessHandle("namenode", NAMENODE_CLASS, self.state_dir)
        self.datanodes = [ProcessHandle(_datanode_name(i), DATANODE_CLASS, self.state_dir) for i in range(datanodes)]
        self.datanode = self.datanodes[0]
        self._registered_pids: dict[str, int] = {}
        self.started: dict[str, int] = {}  # daemon name -> pid, of the daemons the latest up() started
        storage.register_webhdfs(self.namenode_uri, self.webhdfs_url)

    # -- addresses -----------------------------------------------------------
    @property
    def namenode_uri(self) -> str:
        return f"hdfs://127.0.0.1:{self.rpc_port}"

    @property
    def webhdfs_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def all_ports(self) -> dict[str, int]:
        ports = {"namenode rpc": self.rpc_port, "namenode http": self.http_port}
        for handle, (data, data_http, data_ipc) in zip(self.datanodes, self.datanode_port_sets):
            ports.update({handle.name: data, f"{handle.name} http": data_http, f"{handle.name} ipc": data_ipc})
        return ports

    def __repr__(self) -> str:
        return f"LocalHdfs({self.namenode_uri}, state_dir={str(self.state_dir)!r})"

    # -- configuration -------------------------------------------------------
    def write_config(self) -> Path:
        """Render conf/hadoop/*.xml for this instance into <state_dir>/conf; returns that folder."""
        data, data_http, data_ipc = self.datanode_ports
        values = {
            "state_dir": str(self.state_dir),
            "rpc_port": self.rpc_port,
            "http_port": self.http_port,
            "datanode_port": data,
            "datanode_http_port": data_http,
            "datanode_ipc_port": data_ipc,
            "replication": self.replication,
        }
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        for name in CONFIG_TEMPLATES:
            text = (paths.CONF_DIR / "hadoop" / name).read_text()
            for key, value in values.items():
                text = text.replace(f"@{key}@", str(value))
            _write_if_changed(self.conf_dir / name, text)
        _write_if_changed(self.conf_dir / "log4j.properties", LOG4J_PROPERTIES)
        return self.conf_dir

    def classpath(self) -> str:
        # The conf dir goes first: Hadoop reads core-site.xml/hdfs-site.xml from the classpath.
        return os.pathsep.join([str(self.conf_dir), provision.read_classpath(self.hadoop_home)])

    def datanode_command(self, index: int) -> list[str]:
        """DataNode 0 runs on the rendered config; the others override its data dir and ports (-D)."""
        if index == 0:
            return self.java_command(DATANODE_CLASS)
        data, data_http, data_ipc = self.datanode_port_sets[index]
        overrides = {
            "dfs.datanode.data.dir": f"file://{self.state_dir / _datanode_data_dir(index)}",
            "dfs.datanode.address": f"127.0.0.1:{data}",
            "dfs.datanode.http.address": f"127.0.0.1:{data_http}",
            "dfs.datanode.ipc.address": f"127.0.0.1:{data_ipc}",
        }
        return self.java_command(
            DATANODE_CLASS, *[arg for key, value in overrides.items() for arg in ("-D", f"{key}={value}")]
        )

    def java_command(self, main_class: str, *args: str) -> list[str]:
        java = shutil.which("java")
        if not java:
            raise HdfsClusterError("`java` not found on PATH: install a JDK (Java 17 works)")
        return [
            java,
            f"-Xmx{self.heap}",
            "-Djava.net.preferIPv4Stack=true",
            f"-Dhadoop.log.dir={self.state_dir / 'logs'}",
            "-Dhadoop.root.logger=INFO,console",
            "-cp",
            self.classpath(),
            main_class,
            *args,
        ]

    # -- lifecycle -------------------------------------------------------------
    def is_formatted(self) -> bool:
        return (self.state_dir / "name" / "current" / "VERSION").exists()

    def format(self) -> None:
        # A data dir from an earlier namespace would be refused (clusterID mismatch).
        for sub in ("name", *(_datanode_data_dir(i) for i in range(MAX_DATANODES))):
            shutil.rmtree(self.state_dir / sub, ignore_errors=True)
        log_file = self.state_dir / "logs" / "format.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "wb") as log:
            result = subprocess.run(
                self.java_command(NAMENODE_CLASS, "-format", "-nonInteractive", "-force"),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=120,
            )
        if result.returncode != 0 or not self.is_formatted():
            raise HdfsClusterError(
                f"formatting the NameNode failed (exit {result.returncode}); see {log_file}:\n" + _tail(log_file)
            )

    def is_running(self) -> bool:
        return self.namenode.alive() and all(handle.alive() for handle in self.datanodes)

    def up(self, timeout: float = 90) -> LocalHdfs:
        """Start (formatting on first use) and wait until writable; a no-op when already up.

        :attr:`started` names the daemons this call started (none when all were running)."""
        self.started = {}
        with state_lock(self.state_dir):
            self.write_config()  # also refreshes the client config of a running instance
            if self.is_running() and self._is_ready():
                return self
            for handle in (self.namenode, *self.datanodes):
                handle.clear_if_stale()
            self._check_ports_free()
            if not self.is_formatted():
                _log(f"formatting a new namespace in {self.state_dir / 'name'}")
                self.format()
            if not self.namenode.alive():
                self.started[self.namenode.name] = self.namenode.start(self.java_command(NAMENODE_CLASS))
            for index, handle in enumerate(self.datanodes):
                if not handle.alive():
                    self.started[handle.name] = handle.start(self.datanode_command(index))
            self._wait_ready(timeout)
            _log(f"HDFS up: {self.namenode_uri} (WebHDFS {self.webhdfs_url}), state in {self.state_dir}")
            return self

    def down(self, timeout: float = 20) -> None:
        """Stop the DataNodes then the NameNode: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        with state_lock(self.state_dir):
            # Also DataNodes of an earlier `up --datanodes N` with a larger N.
            extra = [
                ProcessHandle(p.stem, DATANODE_CLASS, self.state_dir)
                for p in sorted(self.state_dir.glob("datanode*.pid"))
                if p.stem not in {h.name for h in self.datanodes}
            ]
            for handle in (*self.datanodes, *extra, self.namenode):
                handle.stop(timeout)
            for port in self.all_ports.values():
                wait_for_port_free(port, timeout=5)

    def stop_started(self, started: Mapping[str, int], timeout: float = 20) -> list[str]:
        """Stop the daemons of ``started`` (name -> pid, an earlier :attr:`started`) that still run under that
        pid, DataNodes first; one found running, or restarted since by someone else, is left alone."""
        with state_lock(self.state_dir):
            stopped = []
            for handle in (*self.datanodes, self.namenode):
                pid = started.get(handle.name)
                if pid is not None and handle.pid() == pid and handle.alive():
                    handle.stop(timeout)
                    stopped.append(handle.name)
            for name, port in self.all_ports.items():
                if name.split(" ")[0] in stopped:
                    wait_for_port_free(port, timeout=5)
            return stopped

    @contextmanager
    def running(self, timeout: float = 90) -> Iterator[LocalHdfs]:
        """Up for the block, then stop only what this call started: an HDFS found running stays running."""
        try:
            self.up(timeout)
        except BaseException:
            self.stop_started(self.started)  # a start that failed half-way
            raise
        started = dict(self.started)
        try:
            yield self
        finally:
            self.stop_started(started)

    def status(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "namenode_uri": self.namenode_uri,
            "webhdfs_url": self.webhdfs_url,
            "state_dir": str(self.state_dir),
            "conf_dir": str(self.conf_dir),
            "namenode_pid": self.namenode.pid() if self.namenode.alive() else None,
            "datanode_pid": self.datanode.pid() if self.datanode.alive() else None,
            "datanode_pids": [h.pid() if h.alive() else None for h in self.datanodes],
            "replication": self.replication,
            "formatted": self.is_formatted(),
            "running": self.is_running(),
        }
        jmx = self._jmx_state()
        info.update(jmx or {"safemode": None, "live_datanodes": None})
        info["datanode_registered"] = all(self._datanode_registered(h) for h in self.datanodes)
        info["ready"] = bool(
            info["running"]
            and jmx
            and not jmx["safemode"]
            and jmx["live_datanodes"] >= len(self.datanodes)
            and info["datanode_registered"]
        )
        return info

    # -- helpers ---------------------------------------------------------------
    def _check_ports_free(self) -> None:
        ours = {h.pid() for h in (self.namenode, *self.datanodes) if h.alive()}
        for name, port in self.all_ports.items():
            owner = port_owner(port)
            if owner is None or owner.get("pid") in ours:
                continue
            who = describe_port_owner(owner)
            raise HdfsClusterError(
                f"port {port} ({name}) is in use by {who}: stop it, or start this HDFS on other ports "
                f"(--rpc-port/--http-port/--datanode-ports)"
            )

    def _jmx(self, bean: str, base_url: str | None = None) -> dict[str, Any] | None:
        url = f"{base_url or self.webhdfs_url}/jmx?qry={bean}"
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                beans = json.load(response).get("beans", [])
        except (OSError, ValueError):
            return None
        return beans[0] if beans else None

    def _datanode_registered(self, handle: ProcessHandle) -> bool:
        """That DataNode process has registered and sent its first block report.

        The NameNode alone is not enough: after a DataNode crash it still counts
        the dead one as live for minutes and would send clients to a DataNode
        that has not joined yet. The DataNode's own metrics lag up to 10 s
        behind (JMX cache), so read its log from where this process started.
        """
        pid = handle.pid()
        if pid is None or not handle.alive():
            return False
        if self._registered_pids.get(handle.name) == pid:
            return True
        if handle.log_contains_since_start(BLOCK_REPORT_SENT):
            self._registered_pids[handle.name] = pid
            return True
        return False

    def _jmx_state(self) -> dict[str, Any] | None:
        info = self._jmx("Hadoop:service=NameNode,name=NameNodeInfo")
        state = self._jmx("Hadoop:service=NameNode,name=FSNamesystemState")
        if info is None or state is None:
            return None
        return {"safemode": bool(info.get("Safemode")), "live_datanodes": int(state.get("NumLiveDataNodes", 0))}

    def _is_ready(self) -> bool:
        state = self._jmx_state()
        return bool(
            state
            and not state["safemode"]
            and state["live_datanodes"] >= len(self.datanodes)
            and all(self._datanode_registered(h) for h in self.datanodes)
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for handle in (self.namenode, *self.datanodes):
                if not handle.alive():
                    raise HdfsClusterError(
                        f"the {handle.name} exited during start-up; see {handle.log_file}:\n" + _tail(handle.log_file)
                    )
            if self._is_ready():
                return
            time.sleep(0.5)
        raise HdfsClusterError(
            f"HDFS not ready after {timeout:.0f} s (want: safe mode off and {len(self.datanodes)} live DataNode(s), "
            f"last seen {self._jmx_state()}); logs: {self.namenode.log_file}, "
            + ", ".join(str(h.log_file) for h in self.datanodes)
        )


def _datanode_name(index: int) -> str:
    return "datanode" if index == 0 else f"datanode-{index}"


def _datanode_data_dir(index: int) -> str:
    return "data" if index == 0 else f"data-{index}"


def _datanode_port_sets(ports: list[int], datanodes: int) -> list[tuple[int, int, int]]:
    if len(ports) == 3:
        return [tuple(port + 10 * index for port in ports) for index in range(datanodes)]  # type: ignore[misc]
    if len(ports) != 3 * datanodes:
        raise ValueError(
            f"datanode_ports: want (data transfer, http, ipc) for the first DataNode " f"or for each of the {datanodes}"
        )
    return [tuple(ports[i : i + 3]) for i in range(0, len(ports), 3)]  # type: ignore[misc]


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _log(message: str) -> None:
    print(f"[hdfs] {message}", file=sys.stderr, flush=True)


def default_instance() -> LocalHdfs:
    return LocalHdfs()


def ensure_running(timeout: float = 90) -> LocalHdfs:
    """The default instance, started if it is not up (the tests' ``hdfs_cluster`` fixture)."""
    return default_instance().up(timeout=timeout)


def _parse_ports(text: str) -> tuple[int, ...]:
    parts = [int(p) for p in text.split(",")]
    if not parts or len(parts) % 3:
        raise argparse.ArgumentTypeError("want comma-separated ports: data,http,ipc (per DataNode, or the first one's)")
    return tuple(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cxr_pipeline.infra.localstack.hdfs_cluster",
        description="Start, stop or inspect the local HDFS (NameNode + DataNodes on 127.0.0.1).",
    )
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument(
        "--state-dir", type=Path, default=paths.HDFS_STATE_DIR, help="name/data/log/pid folder (default: %(default)s)"
    )
    parser.add_argument("--rpc-port", type=int, default=9000, help="NameNode RPC port (default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=9870, help="NameNode HTTP/WebHDFS port (default: %(default)s)")
    parser.add_argument(
        "--datanode-ports",
        type=_parse_ports,
        default=(9866, 9864, 9867),
        help="DataNode data,http,ipc ports; with several DataNodes the next ones use +10, +20 "
        "unless all are listed (default: 9866,9864,9867)",
    )
    parser.add_argument(
        "--datanodes",
        type=int,
        default=1,
        choices=range(1, MAX_DATANODES + 1),
        help="DataNodes, also the replication factor: 2 = the replicated layout (default: %(default)s)",
    )
    parser.add_argument("--timeout", type=float, default=90, help="seconds to wait for readiness / clean stop")
    add_config_options(parser, spark=False, verbose=False)
    return parser


def _act(job: Job) -> int:
    """``up``/``down`` (one line for make's console), or ``status`` as JSON: exit 3 when not ready."""
    args = job.args
    try:
        hdfs = LocalHdfs(args.state_dir, args.rpc_port, args.http_port, args.datanode_ports, datanodes=args.datanodes)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.action == "up":
        hdfs.up(timeout=args.timeout)
    elif args.action == "down":
        hdfs.down(timeout=min(args.timeout, 30))
        _log("HDFS stopped")
    status = hdfs.status()
    if args.action == "status":
        print(json.dumps(status, indent=2))
        return 0 if status["ready"] else 3
    if args.action == "up":
        print(
            f"HDFS ready: {status['namenode_uri']} (WebHDFS {status['webhdfs_url']}), "
            f"{status['live_datanodes']} DataNode(s), state in {status['state_dir']}"
        )
    return 0


COMMAND = Command("hdfs_cluster", build_parser, _act, errors=lambda: (HdfsClusterError, provision.ProvisionError))


def main(argv: list[str] | None = None) -> int:
    return run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
