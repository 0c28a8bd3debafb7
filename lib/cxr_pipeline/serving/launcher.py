"""Run the prediction service in a child process (for tests, benchmarks and scripts).

``running_service`` starts ``python -m cxr_pipeline.serving`` on a free loopback port,
waits until ``GET /health`` answers, yields the port and the health document, and
stops the process afterwards (terminate, then kill if it does not exit).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

from ..infra.localstack.processes import free_port
from ..paths import REPO_ROOT

HOST = "127.0.0.1"


def multipart_image(data: bytes, filename: str = "image.jpeg") -> tuple[bytes, str]:
    """``(body, content_type)`` of a multipart form with ``data`` as its ``file`` field."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def get_json(port: int, path: str, host: str = HOST, timeout: float = 30) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def service_command(model: str | os.PathLike, port: int, extra: Sequence[str] = (), host: str = HOST) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cxr_pipeline.serving",
        "--model",
        str(model),
        "--host",
        host,
        "--port",
        str(port),
        "--log-level",
        "warning",
        *extra,
    ]


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for the child: this checkout's ``lib/`` first on PYTHONPATH, quiet TensorFlow."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT / "lib"), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def wait_healthy(port: int, server: subprocess.Popen, timeout: float, log: Path | None = None) -> dict:
    """The /health document once it answers 200; RuntimeError if the process exits, TimeoutError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the service exited with code {server.returncode}{_log_tail(log)}")
        try:
            status, health = get_json(port, "/health", timeout=5)
            if status == 200:
                return health
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the service did not answer /health within {timeout:.0f} s{_log_tail(log)}")
        time.sleep(0.5)


def stop(server: subprocess.Popen, grace: float = 20) -> None:
    server.terminate()
    try:
        server.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@contextlib.contextmanager
def running_service(
    model: str | os.PathLike,
    extra: Sequence[str] = (),
    log: Path | None = None,
    timeout: float = 180,
    env: Mapping[str, str] | None = None,
) -> Iterator[tuple[int, dict]]:
    """Yields ``(port, health)`` of a service serving ``model``; output goes to ``log`` (else inherited)."""
    with service_process(model, extra, log, timeout, env) as (port, health, _server):
        yield port, health


@contextlib.contextmanager
def service_process(
    model: str | os.PathLike,
    extra: Sequence[str] = (),
    log: Path | None = None,
    timeout: float = 180,
    env: Mapping[str, str] | None = None,
) -> Iterator[tuple[int, dict, subprocess.Popen]]:
    """As :func:`running_service`, plus the process (for its pid: memory figures)."""
    port = free_port(HOST)
    with contextlib.ExitStack() as stack:
        out: IO | None = stack.enter_context(Path(log).open("w")) if log else None
        server = subprocess.Popen(
            service_command(model, port, extra),
            cwd=REPO_ROOT,
            env=child_env(env),
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
        )
        try:
            yield port, wait_healthy(port, server, timeout, log), server
        finally:
            stop(server)


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM) in MiB, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def _log_tail(log: Path | None, chars: int = 3000) -> str:
    if log is None or not Path(log).exists():
        return ""
    return ":\n" + Path(log).read_text(errors="replace")[-chars:]
