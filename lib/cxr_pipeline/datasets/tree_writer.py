"""Writing generated grayscale JPEGs into a ``chest_xray`` tree, resumably and in parallel.

Shared by the MedMNIST converter and the synthetic generator: each file is
written to a temporary name and renamed, so an existing file is always complete
and a re-run skips it.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

LABEL_NAMES = ("NORMAL", "PNEUMONIA")  # label 0, label 1

T = TypeVar("T")


def parse_splits(text: str, allowed: Sequence[str] = ("train", "val", "test")) -> list[str]:
    splits = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in splits if s not in allowed]
    if not splits or unknown:
        raise ValueError(f"splits must be a comma-separated subset of {','.join(allowed)}, got {text!r}")
    return splits


def image_path(root: Path, split: str, label: int, file_name: str) -> Path:
    return Path(root) / split / LABEL_NAMES[label] / file_name


def encode_gray_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 array, got {pixels.dtype} {pixels.shape}")
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def run_chunks(worker: Callable[[list[T]], int], tasks: Iterable[T], workers: int, chunk_size: int = 16) -> int:
    """Apply ``worker`` to chunks of ``tasks`` in ``workers`` processes; the sum of its results.

    ``spawn`` rather than ``fork``: the caller may have TensorFlow (and its
    threads) loaded, which a forked child can deadlock on.
    """
    tasks = list(tasks)
    chunks = [tasks[i : i + chunk_size] for i in range(0, len(tasks), chunk_size)]
    if workers <= 1 or len(chunks) <= 1:
        return sum(worker(chunk) for chunk in chunks)
    with multiprocessing.get_context("spawn").Pool(min(workers, len(chunks))) as pool:
        return sum(pool.imap_unordered(worker, chunks))


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
