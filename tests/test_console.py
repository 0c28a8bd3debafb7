"""A console a person can read: Spark at WARN unless --verbose, progress counted in images."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SESSION = """
import sys
from cxr_pipeline.config import deep_merge, load_config
from cxr_pipeline.spark.session import spark_session
config = deep_merge(load_config("local"), {"spark": {"master": "local[1]", "conf": {"spark.ui.enabled": "false"}}})
spark = spark_session(config, verbose=sys.argv[1] == "verbose")
assert spark.range(100).selectExpr("sum(id)").first()[0] == 4950
spark.stop()
"""


def _spark_stderr(mode: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "SPARK_CONF_DIR"}  # as a user's shell would have it
    env.update(PYTHONPATH=str(REPO / "lib"), SPARK_LOCAL_IP="127.0.0.1")
    proc = subprocess.run([sys.executable, "-c", SESSION, mode], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_spark_logs_warnings_only_unless_verbose():
    stderr = _spark_stderr("quiet")
    quiet = [line for line in stderr.splitlines() if " INFO " in line]
    assert quiet == [], stderr[-3000:]
    stderr = _spark_stderr("verbose")
    loud = [line for line in stderr.splitlines() if " INFO " in line]
    assert len(loud) > 5, f"--verbose must bring Spark's INFO logs back: {stderr[-3000:]}"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_images_bar_counts_images_and_is_silent_off_a_terminal(monkeypatch):
    from cxr_pipeline.progress import images_bar

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with images_bar(lambda: 12, total=12, desc="featurizing", interval=0.01):
        pass
    assert "featurizing" in terminal.getvalue() and "12/12" in terminal.getvalue()
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    with images_bar(lambda: 5, total=5, desc="featurizing", interval=0.01):
        pass
    assert pipe.getvalue() == ""


@pytest.mark.parametrize("job", ["train_featurizer.py", "predict.py"])
def test_jobs_offer_verbose(job):
    env = {**os.environ, "PYTHONPATH": str(REPO / "lib")}
    out = subprocess.run([sys.executable, str(REPO / "jobs" / job), "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "--verbose" in out.stdout and "--overwrite" in out.stdout
