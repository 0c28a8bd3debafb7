"""A MedMNIST-style ``.npz`` (e.g. PneumoniaMNIST) as a ``chest_xray`` tree of JPEGs.

Keys ``{split}_images`` (N x H x W uint8, grayscale) and ``{split}_labels``
(N or N x 1; 0 = NORMAL, 1 = PNEUMONIA) become
``<out>/<split>/<CLASS>/pmnist_<split>_<index>.jpeg``, upscaled with bicubic
resampling to ``--size`` pixels (0 keeps the native size). The index is the
image's position in the npz split, so every file traces back to its source row.

PneumoniaMNIST (MedMNIST v2, Yang et al., Scientific Data 2023) is CC BY 4.0 and
derived from the Kermany chest X-rays; it is for development and accuracy work.

    python -m cxr_pipeline.datasets.medmnist --npz pneumoniamnist.npz --out data/pmnist/chest_xray --limit 200
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_pipeline.cli import Command, Job, add_config_options, run
from cxr_pipeline.datasets import tree_writer

FILE_PREFIX = "pmnist"
README_NAME = "MEDMNIST_SOURCE.txt"


def load_split(npz_path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of one split, checked: N x H x W uint8 and labels in {0, 1}."""
    with np.load(npz_path) as data:
        keys = (f"{split}_images", f"{split}_labels")
        missing = [k for k in keys if k not in data.files]
        if missing:
            raise ValueError(f"{npz_path}: no {', '.join(missing)} (has {', '.join(sorted(data.files))})")
        images, labels = data[keys[0]], data[keys[1]]
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{npz_path}: {split}_images must be N x H x W uint8 grayscale, got {images.dtype} {images.shape}"
        )
    labels = labels.reshape(len(labels), -1)
    if labels.shape[1] != 1 or len(labels) != len(images):
        raise ValueError(f"{npz_path}: {split}_labels must hold one label per image, got shape {labels.shape}")
    labels = labels[:, 0]
    bad = sorted(set(np.unique(labels).tolist()) - {0, 1})
    if bad:
        raise ValueError(f"{npz_path}: {split}_labels must be 0 (normal) or 1 (pneumonia), found {bad}")
    return images, labels.astype(int)


def limited_rows(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Row indices to convert: all, or at most ``limit`` split evenly over the classes.

    The npz rows can be sorted by class, so "the first N" could be one class
    only; this takes the first rows of each class instead, the other class
    filling up when one runs short.
    """
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    per_class = [np.flatnonzero(labels == label) for label in (0, 1)]
    normal = min(len(per_class[0]), limit // 2)
    pneumonia = min(len(per_class[1]), limit - normal)
    normal = min(len(per_class[0]), limit - pneumonia)
    return np.sort(np.concatenate([per_class[0][:normal], per_class[1][:pneumonia]]))


def file_name(split: str, index: int) -> str:
    return f"{FILE_PREFIX}_{split}_{index:06d}.jpeg"


def to_pixels(image: np.ndarray, size: int) -> np.ndarray:
    if size and image.shape != (size, size):
        image = np.asarray(Image.fromarray(image, mode="L").resize((size, size), Image.Resampling.BICUBIC))
    return image


def _write_chunk(tasks, out: Path, size: int, quality: int, overwrite: bool) -> int:
    written = 0
    for split, index, label, image in tasks:
        path = tree_writer.image_path(out, split, label, file_name(split, index))
        if path.exists() and not overwrite:
            continue
        tree_writer.write_atomically(path, tree_writer.encode_gray_jpeg(to_pixels(image, size), quality))
        written += 1
    return written


def convert(
    npz_path: Path,
    out: Path,
    size: int = 299,
    splits=("train", "val"),
    limit: int | None = None,
    workers: int = 1,
    quality: int = 95,
    overwrite: bool = False,
) -> dict[str, Counter]:
    """Write the tree; returns per split the count of images per class. Existing files are kept."""
    out = Path(out)
    counts: dict[str, Counter] = {}
    tasks = []
    for split in splits:
        images, labels = load_split(npz_path, split)
        rows = limited_rows(labels, limit)
        counts[split] = Counter(tree_writer.LABEL_NAMES[labels[i]] for i in rows)
        tasks += [(split, int(i), int(labels[i]), images[i]) for i in rows]
    worker = partial(_write_chunk, out=out, size=size, quality=quality, overwrite=overwrite)
    written = tree_writer.run_chunks(worker, tasks, workers, chunk_size=64)
    out.mkdir(parents=True, exist_ok=True)
    (out / README_NAME).write_text(
        f"Converted from {Path(npz_path).name} (MedMNIST v2 / PneumoniaMNIST, CC BY 4.0, Yang et al. 2023;\n"
        f"derived from Kermany et al. 2018). Files {FILE_PREFIX}_<split>_<row>.jpeg, upscaled to {size} px\n"
        f"with bicubic resampling from the {images.shape[1]} px originals. Label 1 -> PNEUMONIA.\n"
    )
    print(
        f"{written} written, {len(tasks) - written} already there: "
        + "; ".join(f"{s} {dict(c)}" for s, c in counts.items()),
        file=sys.stderr,
    )
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cxr_pipeline.datasets.medmnist", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--npz", type=Path, required=True, help="MedMNIST .npz file")
    parser.add_argument("--out", type=Path, required=True, help="tree root to write")
    parser.add_argument(
        "--size", type=int, default=299, help="output side in pixels, 0 = native (default: %(default)s)"
    )
    parser.add_argument("--splits", default="train,val", help="comma-separated (default: %(default)s)")
    parser.add_argument(
        "--limit", type=int, default=None, help="at most N images per split, half from each class (first rows of each)"
    )
    parser.add_argument("--workers", type=int, default=tree_writer.default_workers(), help="default: %(default)s")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite files that already exist")
    add_config_options(parser, spark=False, verbose=False)
    return parser


def _convert(job: Job) -> int:
    args = job.args
    convert(
        args.npz,
        args.out,
        args.size,
        tree_writer.parse_splits(args.splits),
        args.limit,
        args.workers,
        args.quality,
        args.overwrite,
    )
    return 0


COMMAND = Command("medmnist", build_parser, _convert, errors=lambda: (ValueError, FileNotFoundError))


def main(argv=None) -> int:
    return run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
