"""A console a person can read: Spark at WARN unless --verbose, progress counted in images."""

from __future__ import annotations

import io
import os
import re
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
    from cxr_pipeline.infra.progress import images_bar

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


SUBMITTED = """
from cxr_pipeline.config import deep_merge, load_config
from cxr_pipeline.spark.session import spark_session
config = deep_merge(load_config(), {"spark": {"log_level": "WARN", "conf": {"spark.ui.enabled": "false"}}})
spark = spark_session(config)
conf = spark.sparkContext.getConf()
print("DRIVER", conf.get("spark.driver.host"), conf.get("spark.driver.bindAddress", "-"), flush=True)
assert spark.range(10).count() == 10
logger = spark.sparkContext._jvm.org.apache.log4j.LogManager.getLogger("org.apache.spark.CxrProbe")
logger.info("cxr-probe-info")
logger.warn("cxr-probe-warn")
spark.stop()
"""


def _submitted(tmp_path: Path, launcher: str) -> subprocess.CompletedProcess:
    """``SUBMITTED`` through spark-submit --master local[2], from a shell without make's variables."""
    script = tmp_path / "submitted.py"
    script.write_text(SUBMITTED)
    venv_bin = Path(sys.executable).parent
    env = {"PATH": f"{venv_bin}:/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    env.update(PYTHONPATH=str(REPO / "lib"), VIRTUAL_ENV=str(venv_bin.parent))  # as after `source .venv/bin/activate`
    proc = subprocess.run(
        [launcher, "--master", "local[2]", str(script)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_plain_spark_submit_binds_a_local_driver_to_loopback_and_uses_the_jobs_log_settings(tmp_path):
    """`spark-submit` after `source .venv/bin/activate`, no SPARK_LOCAL_IP, no SPARK_CONF_DIR: the session
    still binds to 127.0.0.1, and once it exists Spark logs through conf/spark/log4j2.properties."""
    proc = _submitted(tmp_path, str(Path(sys.executable).parent / "spark-submit"))
    assert "DRIVER 127.0.0.1 127.0.0.1" in proc.stdout
    assert re.search(r"^\d\d:\d\d:\d\d WARN CxrProbe: cxr-probe-warn$", proc.stderr, re.MULTILINE), proc.stderr[-3000:]
    assert "cxr-probe-info" not in proc.stderr


def test_scripts_spark_submit_needs_no_environment(tmp_path):
    """scripts/spark-submit: loopback and the jobs' logging from the JVM's start, so not one of Spark's lines."""
    proc = _submitted(tmp_path, str(REPO / "scripts" / "spark-submit"))
    assert "resolves to a loopback address" not in proc.stderr and "default log4j profile" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if " INFO " in line] == [], proc.stderr[-3000:]
    assert re.search(r"^\d\d:\d\d:\d\d WARN CxrProbe: cxr-probe-warn$", proc.stderr, re.MULTILINE)
