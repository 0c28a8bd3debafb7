"""Dataset statistics for the explore notebook: what is in a ``chest_xray`` tree.

* :func:`image_stats` (Spark): one row per image with its file size, pixel size,
  format and, for a file that does not decode, the reason (same decoder as
  training: :mod:`cxr_pipeline.images.decode`). Computed on the executors; no image
  bytes come back to the driver.
* :func:`dataset_overview`: the reader's rejections (junk files) plus those
  stats, collected as pandas for the summaries below.
* Pure pandas/matplotlib summaries: counts per split and class, file and pixel
  size per class (the NORMAL files are several times larger than the PNEUMONIA
  ones in the Kermany set: a shortcut a model can learn), the problem files,
  and a grid of sample images.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .. import config
from ..images.decode import ImageDecodeError, configured_max_pixels, decode_image, image_info
from ..images.layout import SPLITS

STATS_COLUMNS = ["path", "split", "label_name", "file_size", "width", "height", "format", "error"]
STATS_SCHEMA = (
    "path string, split string, label_name string, file_size long, "
    "width int, height int, format string, error string"
)
# Decoding at a tiny size still reads every JPEG scan (truncation shows) but is cheap.
_CHECK_SIZE = (16, 16)


def describe_image(data: bytes | None, max_pixels: int | None = None) -> dict:
    """``{width, height, format, error}`` of one file's bytes; ``error`` is None for a good image
    (``max_pixels``: None = ``data.max_pixels``)."""
    max_pixels = configured_max_pixels(max_pixels)
    description = {"width": None, "height": None, "format": None, "error": None}
    try:
        width, height, fmt = image_info(data, max_pixels)
        description.update(width=width, height=height, format=fmt)
        decode_image(data, _CHECK_SIZE, max_pixels)
    except ImageDecodeError as err:
        description["error"] = str(err)
    return description


def _stats_batches(batches: Iterator[pd.DataFrame], max_pixels: int) -> Iterator[pd.DataFrame]:
    for batch in batches:
        described = [describe_image(data, max_pixels) for data in batch["content"]]
        sizes = batch["length"] if "length" in batch else batch["content"].map(lambda b: 0 if b is None else len(b))
        out = pd.DataFrame(
            {
                "path": batch["path"],
                "split": batch["split"],
                "label_name": batch["label_name"],
                "file_size": sizes.astype("int64"),
                "width": pd.array([d["width"] for d in described], dtype="Int32"),
                "height": pd.array([d["height"] for d in described], dtype="Int32"),
                "format": [d["format"] for d in described],
                "error": [d["error"] for d in described],
            }
        )
        yield out[STATS_COLUMNS]


def image_stats(images, max_pixels: int | None = None):
    """Spark DataFrame ``[path, split, label_name, content, length?]`` -> per-image stats (:data:`STATS_SCHEMA`);
    ``max_pixels``: None = ``data.max_pixels``."""
    max_pixels = configured_max_pixels(max_pixels)  # on the driver: the executors get the number
    columns = [c for c in ("path", "split", "label_name", "content", "length") if c in images.columns]
    return images.select(*columns).mapInPandas(lambda it: _stats_batches(it, max_pixels), STATS_SCHEMA)


@dataclass
class Overview:
    stats: pd.DataFrame  # one row per image the reader kept (STATS_COLUMNS)
    rejected: pd.DataFrame  # [path, reason]: files the reader excluded as junk
    images: object = None  # the reader's Spark DataFrame (for sample_images), when read from Spark

    @property
    def good(self) -> pd.DataFrame:
        return self.stats[self.stats["error"].isna()]


def dataset_overview(spark, uri: str, source: str | None = None, max_pixels: int | None = None) -> Overview:
    """Read the tree at ``uri`` with the project's reader and collect per-image stats and rejections
    (``source`` and ``max_pixels``: None = ``data.source`` and ``data.max_pixels`` of the configuration)."""
    from ..spark.reader import read_images_with_rejections

    source = config.configured("data.source") if source is None else source
    if source == "image":
        raise ValueError("exploration measures file sizes and decodes the raw bytes: use source binaryFile or parquet")
    result = read_images_with_rejections(spark, uri, source=source)
    stats = image_stats(result.images, max_pixels).toPandas()
    rejected = result.rejected.select("path", "reason").toPandas()
    return Overview(
        stats=stats.sort_values("path").reset_index(drop=True),
        rejected=rejected.sort_values("path").reset_index(drop=True),
        images=result.images,
    )


# ---- pure summaries -------------------------------------------------------------------------


def _split_order(splits: Sequence[str]) -> list[str]:
    known = [s for s in SPLITS if s in set(splits)]
    return known + sorted(set(splits) - set(known))


def counts_by_split_class(stats: pd.DataFrame) -> pd.DataFrame:
    """Usable images per split (rows, train/val/test order) and class (columns), with totals."""
    good = stats[stats["error"].isna()]
    table = pd.crosstab(good["split"], good["label_name"])
    table = table.reindex(_split_order(stats["split"].unique())).fillna(0).astype(int)
    table.columns.name = None
    table["total"] = table.sum(axis=1)
    table.loc["all"] = table.sum(axis=0)
    table.index.name = "split"
    return table


def size_summary(stats: pd.DataFrame) -> pd.DataFrame:
    """Per class: image count, file size (kB) and pixel size medians and ranges."""
    good = stats[stats["error"].isna()].assign(
        file_kb=lambda d: d["file_size"] / 1024.0,
        megapixels=lambda d: d["width"].astype(float) * d["height"].astype(float) / 1e6,
    )
    grouped = good.groupby("label_name")
    summary = pd.DataFrame(
        {
            "images": grouped.size(),
            "file_kb_median": grouped["file_kb"].median(),
            "file_kb_min": grouped["file_kb"].min(),
            "file_kb_max": grouped["file_kb"].max(),
            "width_median": grouped["width"].median(),
            "height_median": grouped["height"].median(),
            "megapixels_median": grouped["megapixels"].median(),
            "bytes_per_pixel_median": (good["file_size"] / (good["megapixels"] * 1e6))
            .groupby(good["label_name"])
            .median(),
        }
    )
    return summary.round(3).reset_index()


def file_size_ratio(stats: pd.DataFrame, larger: str = "NORMAL", smaller: str = "PNEUMONIA") -> float | None:
    """Median file size of class ``larger`` over that of ``smaller`` (None if a class is missing)."""
    good = stats[stats["error"].isna()]
    medians = good.groupby("label_name")["file_size"].median()
    if larger not in medians or smaller not in medians or medians[smaller] == 0:
        return None
    return float(medians[larger] / medians[smaller])


def file_size_separability(stats: pd.DataFrame, positive: str = "PNEUMONIA") -> float | None:
    """AUC of "smaller file = ``positive``": how well file size alone predicts the class.

    0.5 means no shortcut; near 1.0 means a model could classify from file size
    (e.g. JPEG compression differences between the sources of the two classes).
    """
    from ..evaluation.metrics import roc_auc

    good = stats[stats["error"].isna()]
    labels = (good["label_name"] == positive).astype(int).to_numpy()
    return roc_auc(labels, -good["file_size"].to_numpy(dtype=float))


def problem_files(overview: Overview) -> pd.DataFrame:
    """Every file that will not be used and why: reader rejections and images that do not decode."""
    undecodable = overview.stats.loc[overview.stats["error"].notna(), ["path", "error"]].rename(
        columns={"error": "reason"}
    )
    rejected = overview.rejected[["path", "reason"]].assign(stage="reader")
    undecodable = undecodable.assign(stage="decode")
    return pd.concat([rejected, undecodable], ignore_index=True)[["path", "stage", "reason"]]


# ---- samples and plots -------------------------------------------------------------------------


def sample_images(
    images, per_class: int = 4, seed: int = 0, split: str | None = None, exclude: Iterable[str] = ()
) -> pd.DataFrame:
    """Up to ``per_class`` images of each class (a stable pseudo-random pick): pandas ``[path, label_name, content]``.

    ``exclude``: paths not to pick (e.g. the files that do not decode).
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    frame = images if split is None else images.where(F.col("split") == split)
    excluded = list(exclude)
    if excluded:
        frame = frame.where(~F.col("path").isin(excluded))
    rank = F.row_number().over(Window.partitionBy("label_name").orderBy(F.xxhash64("path", F.lit(seed))))
    picked = frame.select("path", "label_name", "content").withColumn("_rank", rank).where(F.col("_rank") <= per_class)
    return picked.drop("_rank").toPandas().sort_values(["label_name", "path"]).reset_index(drop=True)


def thumbnail(data: bytes, height: int = 256) -> np.ndarray | None:
    """An aspect-preserving ``uint8`` thumbnail ``height`` pixels high, or None if the file does not decode."""
    try:
        width, full_height, _ = image_info(data)
        new_width = max(1, round(width * height / full_height))
        return decode_image(data, (height, new_width))
    except ImageDecodeError:
        return None


def _pyplot():
    import matplotlib.pyplot as plt  # headless: matplotlib falls back to Agg by itself

    return plt


def plot_counts(counts: pd.DataFrame, title: str = "Images per split and class"):
    """Grouped bar chart from :func:`counts_by_split_class`."""
    plt = _pyplot()
    table = counts.drop(index="all", errors="ignore").drop(columns="total", errors="ignore")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    positions = np.arange(len(table.index))
    width = 0.8 / max(1, len(table.columns))
    for i, label in enumerate(table.columns):
        bars = ax.bar(positions + i * width, table[label], width, label=label)
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(positions + width * (len(table.columns) - 1) / 2, table.index)
    ax.set(xlabel="split", ylabel="images", title=title)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_sample_grid(samples: pd.DataFrame, thumb_height: int = 256, title: str = "Sample images per class"):
    """One row per class from :func:`sample_images`; a file that does not decode shows as a labelled blank."""
    plt = _pyplot()
    classes = sorted(samples["label_name"].unique())
    columns = max(1, samples.groupby("label_name").size().max()) if len(samples) else 1
    fig, axes = plt.subplots(
        max(1, len(classes)), columns, figsize=(2.4 * columns, 2.6 * max(1, len(classes))), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for row, label in enumerate(classes):
        for col, item in enumerate(samples[samples["label_name"] == label].itertuples()):
            ax = axes[row, col]
            image = thumbnail(item.content, thumb_height)
            parts = str(item.path).rsplit("/", 3)
            name = f"{parts[-3]}/{parts[-1]}" if len(parts) >= 3 else parts[-1]
            if image is None:
                ax.text(0.5, 0.5, "does not decode", ha="center", va="center", color="red")
            else:
                ax.imshow(image)
            ax.set_title(f"{label}\n{name[:34]}", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_size_distributions(stats: pd.DataFrame, title: str = "File and image sizes per class"):
    """File size histogram and width x height scatter, per class."""
    plt = _pyplot()
    good = stats[stats["error"].isna()]
    fig, (ax_file, ax_pixels) = plt.subplots(1, 2, figsize=(10, 3.8))
    bins = np.linspace(0, max(1.0, good["file_size"].max() / 1024.0), 30) if len(good) else 10
    for label, group in good.groupby("label_name"):
        kb = group["file_size"] / 1024.0
        ax_file.hist(kb, bins=bins, alpha=0.6, label=f"{label} (median {kb.median():.0f} kB)")
        ax_pixels.scatter(group["width"], group["height"], s=12, alpha=0.7, label=label)
    ax_file.set(xlabel="file size (kB)", ylabel="images", title="File size")
    ax_pixels.set(xlabel="width (px)", ylabel="height (px)", title="Image size")
    ax_file.legend(fontsize=8)
    ax_pixels.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
