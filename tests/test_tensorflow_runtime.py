"""TensorFlow's start-up notices stay off the console; everything else written meanwhile still reaches it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTICE = "oneDNN custom operations are on"


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    environment.update(PYTHONPATH=str(REPO / "lib"), **env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environment, timeout=300
    )


def test_only_the_notices_are_left_out_and_the_rest_keeps_its_order():
    out = run_python(
        """
        import os, sys
        from cxr_pipeline.models.tensorflow_runtime import START_UP_NOTICES, stderr_without

        with stderr_without(START_UP_NOTICES):
            os.write(2, b"native error before\\n")
            os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on. You may see ...\\n")
            os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
            print("python warning after", file=sys.stderr)
        print("after the block", file=sys.stderr)
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == ["native error before", "python warning after", "after the block"]


def test_what_was_caught_comes_back_when_the_import_fails():
    out = run_python(
        """
        import os
        from cxr_pipeline.models.tensorflow_runtime import stderr_without

        try:
            with stderr_without(["oneDNN"]):
                os.write(2, b"libfoo.so: cannot open shared object file\\n")
                raise ImportError("boom")
        except ImportError:
            pass
        """
    )
    assert out.returncode == 0, out.stderr
    assert "libfoo.so: cannot open shared object file" in out.stderr


IMPORT = """
from cxr_pipeline.models.tensorflow_runtime import import_tensorflow
tf = import_tensorflow()
print(tf.__name__, tf.constant(2).numpy() + 1)
"""


def test_the_first_import_prints_no_start_up_notice():
    out = run_python(IMPORT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["tensorflow", "3"]
    assert NOTICE not in out.stderr and "absl::InitializeLog" not in out.stderr
    assert "This TensorFlow binary is optimized" not in out.stderr  # an INFO line after logging starts


def test_tf_cpp_min_log_level_0_still_shows_the_notices():
    """The control: TensorFlow does print its notices, and asking for every INFO line gets them. The oneDNN
    one only where oneDNN is on by default (Intel CPUs; not AMD EPYC), so the absl one is the sure one."""
    out = run_python(IMPORT, TF_CPP_MIN_LOG_LEVEL="0")
    assert out.returncode == 0, out.stderr
    assert "absl::InitializeLog" in out.stderr
    if platform.machine() in ("x86_64", "AMD64"):  # cpu_feature_guard's INFO line, x86-64 builds only
        assert "This TensorFlow binary is optimized" in out.stderr


def test_two_threads_importing_at_once_leave_stderr_where_it_was():
    out = run_python(
        """
        import sys, threading
        from cxr_pipeline.models.tensorflow_runtime import import_tensorflow

        names = []
        threads = [threading.Thread(target=lambda: names.append(import_tensorflow().__name__)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(names, file=sys.stderr)
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "['tensorflow', 'tensorflow']"
    assert NOTICE not in out.stderr


@pytest.mark.parametrize(
    "code",
    [
        "import cxr_pipeline.cnn.train",  # notebook 03, train_cnn, MLflow's Keras flavour
        # make weights
        "from cxr_pipeline.models.weights.__main__ import main; main(['verify', '--models', 'InceptionV3'])",
    ],
    ids=["cnn", "weights"],
)
def test_entry_points_that_import_keras_print_no_start_up_notice(code):
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert "absl::InitializeLog" not in out.stderr and "This TensorFlow binary is optimized" not in out.stderr
    assert NOTICE not in out.stderr
