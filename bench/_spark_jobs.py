"""Spark's own account of a benchmark run: its jobs and stages read back from an event log.

A benchmark turns the log on with ``event_log_conf(folder)`` (settings for the session builder or
``PYSPARK_SUBMIT_ARGS``); ``stages(folder)`` then lists every completed stage with its wall time,
tasks, and the executors' run and CPU time summed over its tasks, in the order they ran.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


def event_log_conf(folder: Path) -> dict[str, str]:
    return {
        "spark.eventLog.enabled": "true",
        "spark.eventLog.dir": folder.as_uri(),
        "spark.eventLog.rolling.enabled": "false",  # Spark 4 defaults: a folder of zstd files; one plain file here
        "spark.eventLog.compress": "false",
    }


@dataclass
class Stage:
    job: int
    stage: int
    name: str
    began_ms: int
    ended_ms: int
    tasks: int
    run_s: float  # executorRunTime summed over tasks
    cpu_s: float  # executorCpuTime summed over tasks
    gc_s: float

    @property
    def wall_s(self) -> float:
        return (self.ended_ms - self.began_ms) / 1000.0


def _accumulable(info: dict, name: str) -> float:
    for item in info.get("Accumulables", []):
        if item.get("Name") == name:
            return float(item.get("Value", 0))
    return 0.0


def stages(folder: Path) -> list[Stage]:
    """Completed stages of the (single) event log in ``folder``, by start time."""
    logs = [p for p in folder.iterdir() if p.is_file()]
    if len(logs) != 1:
        raise RuntimeError(f"expected one event log in {folder}, found {len(logs)}")
    job_of_stage: dict[int, int] = {}
    found = []
    with logs[0].open() as events:
        for line in events:
            event = json.loads(line)
            kind = event["Event"]
            if kind == "SparkListenerJobStart":
                for stage_id in event["Stage IDs"]:
                    job_of_stage.setdefault(stage_id, event["Job ID"])
            elif kind == "SparkListenerStageCompleted":
                info = event["Stage Info"]
                found.append(
                    Stage(
                        job=job_of_stage.get(info["Stage ID"], -1),
                        stage=info["Stage ID"],
                        name=info["Stage Name"],
                        began_ms=info.get("Submission Time", 0),
                        ended_ms=info.get("Completion Time", 0),
                        tasks=info["Number of Tasks"],
                        run_s=_accumulable(info, "internal.metrics.executorRunTime") / 1e3,
                        cpu_s=_accumulable(info, "internal.metrics.executorCpuTime") / 1e9,
                        gc_s=_accumulable(info, "internal.metrics.jvmGCTime") / 1e3,
                    )
                )
    return sorted(found, key=lambda s: s.began_ms)


def print_stages(found: list[Stage], since_ms: int = 0, until_ms: int | None = None) -> None:
    """One line per stage that started in [since_ms, until_ms] (epoch milliseconds)."""
    chosen = [s for s in found if s.began_ms >= since_ms and (until_ms is None or s.began_ms <= until_ms)]
    if not chosen:
        return
    origin = chosen[0].began_ms
    print(f"  {'start':>7} {'wall':>7} {'tasks':>5} {'run':>8} {'cpu':>8} {'gc':>6}  job/stage  name")
    for s in chosen:
        print(
            f"  {(s.began_ms - origin) / 1e3:6.1f}s {s.wall_s:6.1f}s {s.tasks:5d} {s.run_s:7.1f}s {s.cpu_s:7.1f}s"
            f" {s.gc_s:5.1f}s  {s.job:3d}/{s.stage:<4d}  {s.name}"
        )
