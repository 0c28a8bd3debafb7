"""Packing an image tree once into a Parquet image table.

Thousands of 50-500 kB JPEGs are thousands of HDFS blocks, NameNode objects and
file opens per run; the packed table is a handful of ~128 MB files with one row
per image:

    path, split (folder partition), label, label_name, content (bytes), length,
    width, height, format, sha256

``width``/``height``/``format`` come from the image header (no pixel decoding);
``sha256`` of the bytes finds exact duplicates. Next to the table (hidden from
Spark readers, which skip ``_``-prefixed names) are ``_rejected/`` (CSV: path,
reason) and ``_duplicates/`` (CSV: sha256, paths, count).

Every row also has ``patient``, ``view_position`` and ``source_format``. DICOM files are
stored *without their header*: decoded and windowed once (:func:`cxr_pipeline.images.dicom.pack_payload`)
as a PNG of ``dicom.packed_png_bits`` (8, or 16 for the display values at full precision, tagged so the
decoder scales rather than stretches it), or as the embedded JPEG itself when its display table is the identity; their
``patient`` is the keyed hash of PatientID (``dicom.patient_key``) and ``view_position`` the
header's. Later runs read plain images and never parse DICOM again; the table holds no name,
birth date or raw id. Multi-frame and other unusable DICOM files are listed in ``_rejected``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ..images.decode import ImageDecodeError, configured_max_pixels, image_info
from ..images.dicom import DicomSettings
from ..images.layout import parse_image_path, patient_id
from .reader import read_images_with_rejections

TARGET_FILE_MB = 128
_HEADER_TYPE = T.StructType(
    [
        T.StructField("width", T.IntegerType()),
        T.StructField("height", T.IntegerType()),
        T.StructField("format", T.StringType()),
        T.StructField("reason", T.StringType()),
        T.StructField("packed", T.BinaryType()),  # replacement content (DICOM only)
        T.StructField("patient", T.StringType()),
        T.StructField("view_position", T.StringType()),
        T.StructField("source_format", T.StringType()),
    ]
)


@dataclass(frozen=True)
class PackSummary:
    table_uri: str
    images: int
    rejected: int
    duplicate_groups: int
    duplicate_images: int
    files: int
    total_bytes: int
    label_names: tuple[str, ...]

    def lines(self) -> list[str]:
        return [
            f"packed table: {self.table_uri}",
            f"images: {self.images} ({self.total_bytes / 1e6:.1f} MB) in {self.files} range partition(s), "
            "written under split=<split>/ folders",
            f"classes: {', '.join(f'{i}={n}' for i, n in enumerate(self.label_names))}",
            f"rejected: {self.rejected} (see {self.table_uri}/_rejected)",
            f"exact duplicates: {self.duplicate_images} images in {self.duplicate_groups} groups "
            f"(see {self.table_uri}/_duplicates)",
        ]


def _pack_row(path: str, data: bytes | None, max_pixels: int, patient_key: str, png_bits: int) -> tuple:
    from ..images import dicom
    from ..images.layout import is_dicom

    by_name = patient_id(parse_image_path(path).file_name)
    try:
        if data is not None and is_dicom(data):
            facts = dicom.read_facts(data, patient_key)
            packed, fmt, width, height = dicom.pack_payload(data, max_pixels, png_bits)
            return width, height, fmt, None, packed, facts.patient or by_name, facts.view_position, "DICOM"
        width, height, fmt = image_info(data, max_pixels)
        return width, height, fmt, None, None, by_name, None, fmt
    except ImageDecodeError as exc:
        return None, None, None, str(exc), None, None, None, None


def _header_reader(max_pixels: int, patient_key: str, png_bits: int):
    @F.pandas_udf(_HEADER_TYPE)
    def read_headers(paths: pd.Series, contents: pd.Series) -> pd.DataFrame:
        rows = [_pack_row(p, c, max_pixels, patient_key, png_bits) for p, c in zip(paths, contents)]
        return pd.DataFrame(rows, columns=[f.name for f in _HEADER_TYPE.fields])

    return read_headers


def pack_image_tree(
    spark: SparkSession,
    source_uri: str,
    table_uri: str,
    target_file_mb: int = TARGET_FILE_MB,
    max_pixels: int | None = None,
    overwrite: bool = False,
    dicom: DicomSettings | None = None,
) -> PackSummary:
    """Write the tree at ``source_uri`` as a Parquet image table at ``table_uri``.

    ``dicom``: the ``dicom:`` config section (patient key, frontal_only, packed_png_bits); default read from ``conf/``.
    ``max_pixels``: None = ``data.max_pixels`` of the configuration.
    """
    dicom = dicom or DicomSettings.default()
    max_pixels = configured_max_pixels(max_pixels)
    read = read_images_with_rejections(spark, source_uri, dicom=dicom)
    header = _header_reader(max_pixels, dicom.patient_key, dicom.packed_png_bits)(F.col("path"), F.col("content"))
    with_header = read.images.withColumn("_h", header).cache()
    try:
        content = F.coalesce(F.col("_h.packed"), F.col("content"))
        table = with_header.where("_h.reason IS NULL").select(
            "path",
            "split",
            "label",
            "label_name",
            content.alias("content"),
            F.length(content).cast("long").alias("length"),
            F.col("_h.width").alias("width"),
            F.col("_h.height").alias("height"),
            F.col("_h.format").alias("format"),
            F.sha2(content, 256).alias("sha256"),
            F.col("_h.patient").alias("patient"),
            F.col("_h.view_position").alias("view_position"),
            F.col("_h.source_format").alias("source_format"),
        )
        header_rejects = with_header.where("_h.reason IS NOT NULL").select("path", F.col("_h.reason").alias("reason"))
        rejected = read.rejected.unionByName(header_rejects).cache()

        totals = table.agg(F.count("*").alias("n"), F.coalesce(F.sum("length"), F.lit(0)).alias("bytes")).first()
        files = max(1, math.ceil(totals["bytes"] / (target_file_mb * 1024 * 1024)))
        mode = "overwrite" if overwrite else "errorifexists"
        (
            table.repartitionByRange(files, "split", "path")
            .sortWithinPartitions("split", "path")
            .write.mode(mode)
            .partitionBy("split")
            .parquet(table_uri)
        )
        rejected.coalesce(1).write.mode("overwrite").option("header", True).csv(f"{table_uri.rstrip('/')}/_rejected")
        # Read back from the written table: no second pass over the source tree.
        duplicates = find_duplicates(spark.read.parquet(table_uri)).cache()
        duplicates.withColumn("paths", F.concat_ws(";", "paths")).coalesce(1).write.mode("overwrite").option(
            "header", True
        ).csv(f"{table_uri.rstrip('/')}/_duplicates")
        dup_stats = duplicates.agg(
            F.count("*").alias("groups"), F.coalesce(F.sum("count"), F.lit(0)).alias("images")
        ).first()
        return PackSummary(
            table_uri=table_uri,
            images=int(totals["n"]),
            rejected=rejected.count(),
            duplicate_groups=int(dup_stats["groups"]),
            duplicate_images=int(dup_stats["images"]),
            files=files,
            total_bytes=int(totals["bytes"]),
            label_names=read.label_names,
        )
    finally:
        with_header.unpersist()


def find_duplicates(table: DataFrame) -> DataFrame:
    """``sha256, count, paths`` of exact duplicate images in a packed table (or any frame with sha256)."""
    return (
        table.groupBy("sha256")
        .agg(F.count("*").alias("count"), F.sort_array(F.collect_list("path")).alias("paths"))
        .where("count > 1")
    )
