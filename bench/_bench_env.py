"""What every Spark benchmark sets up before it starts Spark (``from _bench_env import REPO``).

This checkout's ``lib/`` (run as ``PYTHONPATH=lib .venv/bin/python bench/...``) is what the Python workers Spark
starts import too,
Spark binds to the loopback address, its workers run this interpreter, and TensorFlow logs warnings only:
the environment the Makefile gives the jobs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIB = str(REPO / "lib")

os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (LIB, os.environ.get("PYTHONPATH", "")) if p)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
