"""What every Spark benchmark sets up before it starts Spark (``from _bench_env import REPO``).

This checkout's ``lib/`` is importable in the benchmark and in the Python workers Spark starts for it,
Spark binds to the loopback address, its workers run this interpreter, and TensorFlow logs warnings only:
the environment the Makefile gives the jobs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIB = str(REPO / "lib")

if LIB not in sys.path:
    sys.path.insert(0, LIB)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (LIB, os.environ.get("PYTHONPATH", "")) if p)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
