"""Shared by the serving tests: real trained runs, bad-input files, a live server.

The runs are trained once per test session (cached per output folder) by the
project's own jobs on the real sample tree: a Spark run (ImageFeaturizer ->
StandardScaler -> LogisticRegression, exported to classifier.json) and a
one-epoch small CNN.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from job_args import NO_TRACKING

from cxr_pipeline.serving.launcher import HOST, multipart_image, running_service

REPO = Path(__file__).resolve().parents[1]

_runs: dict[str, Path] = {}


def runs_base(tmp_path_factory) -> Path:
    """Where the session's runs go: a fresh temporary folder, or $CXR_SERVING_TEST_RUNS to
    reuse runs trained by an earlier session (for iterating on the service, not for CI)."""
    base = Path(os.environ.get("CXR_SERVING_TEST_RUNS") or tmp_path_factory.getbasetemp() / "serving_runs")
    base.mkdir(parents=True, exist_ok=True)
    return base


def job_env() -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONPATH=f"{REPO / 'lib'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        SPARK_LOCAL_IP="127.0.0.1",
        PYSPARK_PYTHON=sys.executable,
        PYSPARK_DRIVER_PYTHON=sys.executable,
        TF_CPP_MIN_LOG_LEVEL="2",
    )


def run_job(args: list[str], log: Path, timeout: float = 900) -> None:
    with log.open("w") as out:
        result = subprocess.run(
            [sys.executable, *args], cwd=REPO, env=job_env(), stdout=out, stderr=subprocess.STDOUT, timeout=timeout
        )
    if result.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(args[:1])} failed with code {result.returncode}:\n{tail}")


def complete(run: Path) -> bool:
    """A run the jobs finished (``_SUCCESS`` last); anything else under the name is retrained."""
    return (run / "_SUCCESS").exists()


def spark_run(base: Path, data: Path) -> Path:
    """A tiny run of jobs/train_featurizer.py (InceptionV3 cut at mixed0, no tuning)."""
    out = base / "spark_run"
    if str(out) not in _runs and not complete(out):
        shutil.rmtree(out, ignore_errors=True)
        run_job(
            [
                "jobs/train_featurizer.py",
                "--data",
                str(data),
                "--out",
                str(out),
                "--feature-layer",
                "mixed0",
                "--tuning",
                "none",
                "--validation",
                "folder",
                "--features-cache",
                str(base / "features_cache"),
                *NO_TRACKING,
            ],
            base / "train_featurizer.log",
        )
    _runs[str(out)] = out
    return out


def cnn_run(base: Path, data: Path) -> Path:
    """A one-epoch small CNN from jobs/train_cnn.py at 64 px."""
    out = base / "cnn_run"
    if str(out) not in _runs and not complete(out):
        shutil.rmtree(out, ignore_errors=True)
        run_job(
            [
                "jobs/train_cnn.py",
                "--data",
                str(data),
                "--out",
                str(out),
                "--model",
                "small_cnn",
                "--epochs",
                "1",
                "--image-size",
                "64",
                "--batch-size",
                "8",
                "--verbose",
                "0",
                "--set",
                "training.validation=folder",
                *NO_TRACKING,
            ],
            base / "train_cnn.log",
        )
    _runs[str(out)] = out
    return out


def sample_images(tree: Path) -> list[Path]:
    return sorted(tree.rglob("*.jpeg"))


# ----------------------------------------------------------------------------
# Bad inputs (each must be rejected by cxr_pipeline.images.decode as well)


def truncated_jpeg(good: bytes) -> bytes:
    return good[: len(good) // 2]


def corrupt_jpeg(good: bytes) -> bytes:
    """A JPEG signature followed by garbage: claims to be a JPEG, is not one."""
    return good[:4] + bytes((i * 37) % 251 for i in range(4000))


def not_an_image() -> bytes:
    return b"patient,finding\n1,pneumonia\n" * 20


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A noisy grayscale PNG (noise does not compress: the size is about width*height bytes)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


# ----------------------------------------------------------------------------
# A live service (uvicorn in a subprocess) for end-to-end tests


def post_image(port: int, data: bytes, filename: str = "image.jpeg") -> tuple[int, dict]:
    body, content_type = multipart_image(data, filename)
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    conn.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


@contextlib.contextmanager
def live_service(model: Path, log: Path, *extra: str, timeout: float = 180) -> Iterator[int]:
    """``python -m cxr_pipeline.serving`` on a free loopback port; yields the port once /health answers."""
    with running_service(model, extra, log=log, timeout=timeout, env=job_env()) as (port, _health):
        yield port
