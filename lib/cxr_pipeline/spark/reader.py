"""Reading a ``chest_xray``-style image tree (or a packed image table) into Spark.

``read_images_with_rejections(spark, "hdfs://nn:9000/data/chest_xray")`` returns
a :class:`ReadResult`: ``images`` with the columns

    path (string, full URI), split, label (int), label_name, content (binary), length (long), identity (string)

and ``rejected`` (``path``, ``reason``) listing every file that was left out.
Folder names are not ``key=value``, so Spark's partition discovery does not
apply: split and class come from the path (:mod:`cxr_pipeline.images.layout`),
and the integer label is the index of the class folder name in sorted order
(NORMAL=0, PNEUMONIA=1; any number of classes works).

Rejections made here are the ones file metadata can tell (wrong layout, not an
image extension, zero bytes) and never touch the file contents; files whose
*bytes* are bad (not an image, truncated or corrupt JPEG) are reported by the
featurizer in its error column. Hadoop itself skips hidden files (``.x``, ``_x``).

``identity`` tells one version of an image from another without reading its bytes: the file's
size and modification time (``size|seconds``), or the sha256 of the bytes for a packed table
(:mod:`cxr_pipeline.spark.feature_cache` reuses a row's features only while its identity is unchanged).

Sources: ``binaryFile`` (default: raw bytes, decoded later in pandas UDFs),
``image`` (Spark's built-in image source, decoded by the JVM into an ``image``
struct column instead of ``content``) and ``parquet`` (a table written by
:mod:`cxr_pipeline.spark.packing`).

DICOM (``.dcm``/``.dicom``) files are images like any other here; the featurizer
decodes them (:mod:`cxr_pipeline.images.dicom`). ``ReadResult.patients`` gives, for every
image, ``path, patient, view_position``: the patient is the keyed hash of the
header's PatientID when there is one (``dicom.patient_key``; the raw id never
leaves the Python worker), else the patient of the file name
(:func:`cxr_pipeline.images.layout.patient_id`). With ``dicom.frontal_only`` the
images whose ViewPosition is not PA/AP are rejected ("view LATERAL is not frontal").
Reading DICOM headers reads the DICOM files once more; a packed table keeps the
de-identified columns and skips that.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ..images.dicom import FRONTAL_VIEWS, DicomSettings
from ..images.layout import (
    DICOM_EXTENSIONS,
    IMAGE_EXTENSIONS,
    SPLITS,
    LayoutError,
    junk_reason,
    label_index,
    parse_image_path,
    patient_id,
)

SOURCES = ("binaryFile", "image", "parquet")
IMAGE_COLUMNS = ("path", "split", "label", "label_name", "content", "length", "identity")
REJECTED_SCHEMA = "path string, reason string"
LAYOUT_REASON = "not in a <split>/<CLASS>/ folder"

PATIENT_SCHEMA = T.StructType(
    [T.StructField("patient", T.StringType()), T.StructField("view_position", T.StringType())]
)


@dataclass(frozen=True)
class ReadResult:
    images: DataFrame  # path, split, label, label_name, content, length, identity
    rejected: DataFrame  # path, reason
    label_names: tuple[str, ...]  # index i is label i
    # path, patient, view_position: one row per image (no raw header value); None when no image has a header
    # to read (no DICOM): every patient is then the file name's (dataset_layout.patient_id), nothing to collect
    patients: DataFrame | None = None
    listing_only_paths: bool = False  # the images' paths and labels read no file bytes (binaryFile, no DICOM)
    payload: str = "content"  # the images' pixel column: content (bytes), or image (Spark's image source's struct)
    image_count: int | None = None  # the usable images, when the listing already counted them

    def labelled_paths(self) -> DataFrame:
        """``path, split, label, label_name`` of the usable images, as one task where that reads no file bytes."""
        return self._listing_query(self.images.select("path", "split", "label", "label_name"))

    def identities(self) -> DataFrame:
        """``path, identity`` of the usable images (see :meth:`labelled_paths`)."""
        return self._listing_query(self.images.select("path", "identity"))

    def count_images(self) -> int:
        """How many usable images: known from the listing, else counted (see :meth:`labelled_paths`)."""
        return self.image_count if self.image_count is not None else self.labelled_paths().count()

    def _listing_query(self, query: DataFrame) -> DataFrame:
        return in_one_task(query) if self.listing_only_paths else query


def configured_source(source: str | None) -> str:
    """``source``, or ``data.source`` of the configuration when None; refused unless one of :data:`SOURCES`."""
    from .. import config as cfg

    chosen = cfg.configured("data.source") if source is None else source
    return cfg.require_choice(chosen, SOURCES, "data.source")


def is_dicom_path(path: Column) -> Column:
    lower = F.lower(path)
    result = F.lit(False)
    for extension in DICOM_EXTENSIONS:
        result = result | lower.endswith(extension)
    return result


def patient_facts_udf(patient_key: str):
    """pandas UDF ``(path, content or null) -> struct(patient, view_position)``.

    ``content`` is the bytes of a DICOM file (null for other files, whose patient comes from the name).
    A header that cannot be read falls back to the name too: the featurizer records why it is unusable.
    """
    from ..images import dicom
    from ..images.decode import ImageDecodeError

    def one(path: str, content) -> tuple[str, str | None]:
        by_name = patient_id(parse_image_path(path).file_name)
        if content is None:
            return by_name, None
        try:
            facts = dicom.read_facts(bytes(content), patient_key)
        except ImageDecodeError:
            return by_name, None
        return facts.patient or by_name, facts.view_position

    @F.pandas_udf(PATIENT_SCHEMA)
    def facts(paths: pd.Series, contents: pd.Series) -> pd.DataFrame:
        return pd.DataFrame([one(p, c) for p, c in zip(paths, contents)], columns=["patient", "view_position"])

    return facts


def _patients(images: DataFrame, settings: DicomSettings) -> DataFrame:
    """Patient and view of every image of a tree holding DICOM files (the other files' patient: their name)."""
    content = F.when(is_dicom_path(F.col("path")), F.col("content"))
    facts = patient_facts_udf(settings.patient_key)(F.col("path"), content)
    return images.select("path", facts.alias("_f")).select("path", "_f.patient", "_f.view_position")


def _keep_frontal(
    images: DataFrame, rejected: DataFrame, patients: DataFrame
) -> tuple[DataFrame, DataFrame, DataFrame]:
    """``dicom.frontal_only``: images with a ViewPosition other than PA/AP become rejections."""
    other_view = patients.where(
        F.col("view_position").isNotNull() & ~F.upper("view_position").isin(list(FRONTAL_VIEWS))
    )
    dropped = other_view.select(
        "path",
        F.concat(F.lit("view "), F.col("view_position"), F.lit(" is not frontal (dicom.frontal_only)")).alias("reason"),
    )
    return (
        images.join(dropped.select("path"), "path", "left_anti"),
        rejected.unionByName(dropped),
        patients.join(dropped.select("path"), "path", "left_anti"),
    )


def classify_path(path: str, length: int | None) -> tuple[str | None, str | None, str | None]:
    """``(split, label_name, None)`` for a usable file, ``(None, None, reason)`` otherwise."""
    try:
        parsed = parse_image_path(path)
    except LayoutError:
        return None, None, LAYOUT_REASON
    reason = junk_reason(parsed.file_name, length)
    if reason:
        return None, None, reason
    return parsed.split, parsed.label_name, None


def classify_column(path: Column, length: Column) -> Column:
    """:func:`classify_path` as a Spark SQL expression: ``struct(split, label_name, reason)``.

    Plain SQL rather than a Python UDF on purpose: an extra Python UDF in the
    plan takes its own Python workers, which then do not hold the featurizer's
    cached model. tests/test_reader.py checks both agree.

    The last three components are cut with ``substring_index``, not a regular expression: with
    ``regexp_extract`` this column cost 144 us per path (the pattern is matched again for every use of
    each component), with ``substring_index`` the three cuts cost about 1 us (``local[1]``, 400,000 paths).
    A missing or empty component comes out empty, and the checks below reject it.
    """
    split, label_name, file_name = _last_three_components(path)
    lower = F.lower(file_name)
    has_image_extension = F.lit(False)
    for extension in IMAGE_EXTENSIONS:
        has_image_extension = has_image_extension | lower.endswith(extension)
    reason = (
        F.when(~split.isin(list(SPLITS)) | (label_name == "") | (file_name == ""), F.lit(LAYOUT_REASON))
        .when(file_name.startswith("."), F.lit("hidden file"))
        .when(~has_image_extension, F.lit("not an image extension"))
        .when(length == 0, F.lit("zero-byte file"))
    )
    usable = reason.isNull()
    return F.struct(
        F.when(usable, split).alias("split"),
        F.when(usable, label_name).alias("label_name"),
        reason.alias("reason"),
    )


def _last_three_components(path: Column) -> tuple[Column, Column, Column]:
    """``(split, class, file)`` of ``.../split/class/file``; all empty when the path has fewer than three."""

    def component(from_end: int) -> Column:
        return F.substring_index(F.substring_index(path, "/", -from_end), "/", 1)

    has_three = F.substring_index(path, "/", -2) != path  # at least two slashes
    return tuple(F.when(has_three, component(k)).otherwise(F.lit("")) for k in (3, 2, 1))


def _with_labels(df: DataFrame, label_names: Sequence[str]) -> DataFrame:
    index = label_index(label_names)
    mapping = F.create_map(*[F.lit(x) for pair in index.items() for x in pair])
    return df.withColumn("label", mapping[F.col("label_name")].cast("int"))


def in_one_task(listing: DataFrame) -> DataFrame:
    """``listing``, a query that reads no file contents (paths, sizes, times), as one task.

    binaryFile cuts a tree into tasks sized for reading the files' bytes (33 for 1,000 X-rays). A query
    that reads none of them would pay Spark's scheduling of each task for nothing: 0.4-0.5 s a job at
    33 tasks against 0.1-0.2 s in one (``bench/bench_training_phases.py --stages``). Counting 100,000
    listed paths took 1.8-1.9 s in one task against 8.5-9.2 s in their 3,125 splits (``local[2]``), and a
    broadcast of them goes through the driver anyway.
    """
    return listing.coalesce(1)


def _usable_files_by_class(classified: DataFrame, one_task: bool) -> dict[tuple[str, bool], int]:
    """``(class folder, is DICOM) -> usable files``, in one query: the class names, whether any header is to
    be read and the image count all come from it. ``one_task``: the classification reads no file contents
    (binaryFile), so the query is one task."""
    usable = classified.where("_meta.reason IS NULL").select(
        F.col("_meta.label_name").alias("label_name"), is_dicom_path(F.col("path")).alias("dicom")
    )
    rows = (in_one_task(usable) if one_task else usable).groupBy("label_name", "dicom").count().collect()
    return {(row["label_name"], row["dicom"]): row["count"] for row in rows}


def _class_names(by_class: dict[tuple[str, bool], int]) -> tuple[str, ...]:
    names = sorted({name for name, _ in by_class})
    if not names:
        raise LayoutError("no images found in <split>/<CLASS>/ folders")
    return tuple(names)


def file_identity() -> Column:
    """``size|modification time in seconds`` of the file a row was read from, from Spark's hidden
    ``_metadata`` column: known from the listing, for any file source (the image source has no
    ``length`` or ``modificationTime`` of its own)."""
    return F.concat_ws(
        "|",
        F.col("_metadata.file_size").cast("string"),
        F.col("_metadata.file_modification_time").cast("double").cast("string"),
    ).alias("identity")


def _load_raw(spark: SparkSession, uri: str, source: str, path_glob: str | None) -> DataFrame:
    if source == "binaryFile":
        reader = spark.read.format("binaryFile").option("recursiveFileLookup", "true")
        if path_glob:
            reader = reader.option("pathGlobFilter", path_glob)
        return reader.load(uri).select("path", "content", "length", file_identity())
    if source == "image":
        reader = spark.read.format("image").option("dropInvalid", "false").option("recursiveFileLookup", "true")
        if path_glob:
            reader = reader.option("pathGlobFilter", path_glob)
        raw = reader.load(uri)
        return raw.select(
            # origin says file:///x where binaryFile's path says file:/x
            F.regexp_replace("image.origin", "^file:///", "file:/").alias("path"),
            "image",
            F.when(F.col("image.height") > 0, F.length("image.data"))
            .otherwise(F.lit(None))
            .cast("long")
            .alias("length"),
            file_identity(),
        )
    raise ValueError(f"unknown image source {source!r}; choose one of {', '.join(SOURCES)}")


def read_images_with_rejections(
    spark: SparkSession,
    uri: str,
    source: str | None = None,
    label_names: Iterable[str] | None = None,
    path_glob: str | None = None,
    dicom: DicomSettings | None = None,
) -> ReadResult:
    """The tree (or packed table) at ``uri``, with the files left out and why.

    ``label_names`` fixes the class list (e.g. the one a model was trained on);
    by default it is discovered from the class folders. ``path_glob`` is
    Spark's ``pathGlobFilter`` (e.g. ``"*.jpeg"``): files it hides are not reported.
    ``dicom``: the ``dicom:`` config section (default: read from ``conf/``); ``source``: None = ``data.source``.
    """
    dicom = dicom or DicomSettings.default()
    source = configured_source(source)
    if source == "parquet":
        return read_image_table_with_rejections(spark, uri, label_names, dicom)
    raw = _load_raw(spark, uri, source, path_glob)
    # Spark's image source marks undecodable files with height -1 instead of failing.
    length = F.col("length") if source == "binaryFile" else F.coalesce("length", F.lit(1))
    classified = raw.withColumn("_meta", classify_column(F.col("path"), length))
    if source == "image":
        bad_image = F.col("image.height") < 0
        classified = classified.withColumn(
            "_meta",
            F.when(
                F.col("_meta.reason").isNull() & bad_image,
                F.struct(
                    F.lit(None).cast("string").alias("split"),
                    F.lit(None).cast("string").alias("label_name"),
                    F.lit("not decodable by Spark's image source").alias("reason"),
                ),
            ).otherwise(F.col("_meta")),
        )
    binary = source == "binaryFile"
    # Spark's image source classifies a file by decoding it: no listing pass unless the classes are to be found
    by_class = _usable_files_by_class(classified, one_task=binary) if binary or label_names is None else {}
    names = tuple(sorted(set(label_names))) if label_names is not None else _class_names(by_class)

    known = F.col("_meta.label_name").isin(list(names))
    good = classified.where(F.col("_meta.reason").isNull() & known)
    payload = "content" if source == "binaryFile" else "image"
    images = _with_labels(
        good.select(
            "path",
            F.col("_meta.split").alias("split"),
            F.col("_meta.label_name").alias("label_name"),
            payload,
            "length",
            "identity",
        ),
        names,
    ).select("path", "split", "label", "label_name", payload, "length", "identity")
    rejected = classified.where(F.col("_meta.reason").isNotNull() | ~known).select(
        "path",
        F.coalesce(F.col("_meta.reason"), F.concat(F.lit("class folder not in "), F.lit(",".join(names)))).alias(
            "reason"
        ),
    )
    rejected = rejected.unionByName(_unscanned_files(spark, raw, listing_only=binary))
    has_dicom = binary and any(dicom for (name, dicom) in by_class if name in names)
    patients = None
    if has_dicom:
        patients = _patients(images, dicom)
        if dicom.frontal_only:
            images, rejected, patients = _keep_frontal(images, rejected, patients)
    listing_only = binary and not has_dicom  # no rejection needs a file's bytes either
    return ReadResult(
        images=images,
        rejected=in_one_task(rejected) if listing_only else rejected,
        label_names=names,
        patients=patients,
        listing_only_paths=listing_only,
        payload=payload,
        image_count=sum(n for (name, _), n in by_class.items() if name in names) if listing_only else None,
    )


def _hadoop_path_form(uri: str) -> str:
    # inputFiles() says file:///x where the scan's path column says file:/x
    return "file:/" + uri[len("file:///") :] if uri.startswith("file:///") else uri


def _unscanned_files(spark: SparkSession, raw: DataFrame, listing_only: bool) -> DataFrame:
    """Listed files the scan produced no row for: Spark's file sources skip zero-byte files.

    ``listing_only``: the scan's paths come without reading any bytes (binaryFile), so they are read in one task.
    """
    listed = [(_hadoop_path_form(uri),) for uri in raw.inputFiles()]
    if not listed:
        return spark.createDataFrame([], REJECTED_SCHEMA)
    scanned = raw.select("path")
    return (
        spark.createDataFrame(listed, "path string")
        .join(in_one_task(scanned) if listing_only else scanned, "path", "left_anti")
        .withColumn("reason", F.lit("zero-byte file"))
    )


def read_image_tree(spark: SparkSession, uri: str, source: str | None = None, **options) -> DataFrame:
    """Only the usable images of the tree at ``uri`` (see :func:`read_images_with_rejections`)."""
    return read_images_with_rejections(spark, uri, source, **options).images


def read_image_table_with_rejections(
    spark: SparkSession, uri: str, label_names: Iterable[str] | None = None, dicom: DicomSettings | None = None
) -> ReadResult:
    """A packed Parquet image table; its own rejections were recorded when it was packed.

    Tables packed from DICOM carry de-identified ``patient``/``view_position`` columns; older tables
    get the patient from the file name.
    """
    dicom = dicom or DicomSettings.default()
    table = spark.read.parquet(uri)
    missing = [c for c in ("path", "split", "label_name", "content") if c not in table.columns]
    if missing:
        raise ValueError(f"{uri} is not a packed image table: missing column(s) {', '.join(missing)}")
    if label_names is None:
        names = tuple(sorted(r[0] for r in table.select("label_name").distinct().collect()))
    else:
        names = tuple(sorted(set(label_names)))
    known = F.col("label_name").isin(list(names))
    # Tables packed with a sha256 column carry their identity already; older ones are hashed here.
    identity = F.col("sha256") if "sha256" in table.columns else F.sha2(F.col("content"), 256)
    images = _with_labels(table.where(known), names).withColumn("identity", identity).select(*IMAGE_COLUMNS)
    rejected = table.where(~known).select(
        "path", F.concat(F.lit("class folder not in "), F.lit(",".join(names))).alias("reason")
    )
    if {"patient", "view_position"} <= set(table.columns):
        patients = table.where(known).select("path", "patient", "view_position")
        if dicom.frontal_only:
            images, rejected, patients = _keep_frontal(images, rejected, patients)
    else:
        patients = None  # an older table: patients come from the file names
    return ReadResult(images=images, rejected=rejected, label_names=names, patients=patients)


def read_image_table(spark: SparkSession, uri: str) -> DataFrame:
    """The images of a packed Parquet table (:mod:`cxr_pipeline.spark.packing`)."""
    return read_image_table_with_rejections(spark, uri).images


def read_images(spark: SparkSession, uri: str, source: str | None = None, **options) -> DataFrame:
    """Dispatch on ``source``: ``binaryFile`` / ``image`` (a tree) or ``parquet`` (a packed table)."""
    return read_images_with_rejections(spark, uri, source, **options).images
