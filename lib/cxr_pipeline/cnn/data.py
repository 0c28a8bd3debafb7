"""The chest_xray tree (local or any Hadoop URI) as ``tf.data`` pipelines.

Listing and labels come from ``storage.list_files`` + ``dataset_layout``, the
validation carve from ``splits`` (patient-grouped, as in the Spark job: a DICOM file's
patient is the keyed hash of its PatientID, :func:`cxr_pipeline.images.dicom.read_facts`, or the
packed table's ``patient`` column; other files' patient comes from the file name), and
pixels from ``imaging.decode_image`` inside ``tf.numpy_function``, so the CNN
sees exactly the pixels the Spark featurizer sees.

Files are read lazily (``tf.io.read_file`` for local paths, ``storage.read_bytes``
for hdfs:// and other remote URIs) in parallel; a packed Parquet image table
(``jobs/pack_images.py``) is streamed one Parquet file at a time. Decoded images are cached
(memory or a cache file) so later epochs decode nothing. ``prepare`` runs the
decode pass once before training: files that fail to decode are recorded as
rejections and excluded, and the cache is complete when training starts.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from cxr_pipeline.images import layout as dataset_layout
from cxr_pipeline.images import splits
from cxr_pipeline.images.dicom import DicomSettings

AUTOTUNE = tf.data.AUTOTUNE


@dataclass(frozen=True)
class ImageRecord:
    uri: str
    label: int
    split: str  # folder split: train | val | test
    file_name: str
    table_file: str | None = None  # packed Parquet file holding the bytes; None = read ``uri`` itself
    patient: str | None = None  # from the image header (keyed hash of a DICOM PatientID); None = from the file name

    def grouping_name(self) -> str:
        """What ``splits`` groups by: the header's patient, else the file name (``training.assign_subsets``'s rule)."""
        if self.patient and self.patient != dataset_layout.patient_id(self.file_name):
            return self.patient
        return self.file_name


@dataclass
class Rejections:
    """(uri, reason) of every file left out, appended to from tf.data worker threads."""

    items: list[tuple[str, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, uri: str, reason: str) -> None:
        with self._lock:
            self.items.append((uri, reason))

    def uris(self) -> set[str]:
        with self._lock:
            return {uri for uri, _ in self.items}

    def to_csv(self) -> str:
        with self._lock:
            rows = [f'"{u}","{r}"' for u, r in self.items]
        return "\n".join(["path,reason", *rows]) + "\n"


@dataclass
class DataSplits:
    train: list[ImageRecord]
    val: list[ImageRecord]
    test: list[ImageRecord]
    label_names: list[str]
    rejections: Rejections

    def counts(self) -> dict[str, list[int]]:
        return {name: class_counts(getattr(self, name), len(self.label_names)) for name in ("train", "val", "test")}


def class_counts(records: Sequence[ImageRecord], n_classes: int = 2) -> list[int]:
    counts = [0] * n_classes
    for r in records:
        counts[r.label] += 1
    return counts


# ------------------------------------------------------------------ listing


def _dicom_patient(uri: str, patient_key: str) -> str | None:
    """The keyed pseudonym of a DICOM file's PatientID (never the raw id); None when it has none or no readable
    header (the decode pass records why such a file is unusable), exactly as the Spark reader's patients column."""
    from cxr_pipeline.images import dicom
    from cxr_pipeline.images.decode import ImageDecodeError
    from cxr_pipeline.infra import storage

    try:
        return dicom.read_facts(storage.read_bytes(uri), patient_key).patient
    except (ImageDecodeError, OSError):
        return None


def _with_header_patients(records: list[ImageRecord], patient_key: str | None) -> list[ImageRecord]:
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    dicom_records = [r for r in records if r.file_name.lower().endswith(dataset_layout.DICOM_EXTENSIONS)]
    if not dicom_records:
        return records
    key = patient_key if patient_key is not None else DicomSettings.default().patient_key
    with ThreadPoolExecutor(max_workers=8) as pool:
        found = pool.map(lambda r: _dicom_patient(r.uri, key), dicom_records)
        patients = dict(zip((r.uri for r in dicom_records), found))
    return [replace(r, patient=patients[r.uri]) if patients.get(r.uri) else r for r in records]


def list_image_tree(
    uri: str, rejections: Rejections | None = None, patient_key: str | None = None
) -> tuple[list[ImageRecord], list[str]]:
    """Every image under ``uri`` (a ``<split>/<CLASS>/<file>`` tree) with its label;
    junk (hidden, wrong extension, empty, outside the layout) goes to ``rejections``.
    DICOM files carry their header's patient (keyed with ``patient_key``, default ``dicom.patient_key`` of conf/)."""
    from cxr_pipeline.infra import storage

    rejections = rejections if rejections is not None else Rejections()
    candidates: list[tuple[str, dataset_layout.ImagePath]] = []
    for info in storage.list_files(uri, recursive=True):
        reason = dataset_layout.junk_reason(info.uri, info.size)
        if reason is None:
            try:
                candidates.append((info.uri, dataset_layout.parse_image_path(info.uri)))
                continue
            except dataset_layout.LayoutError as exc:
                reason = f"outside the split/CLASS layout ({exc})"
        rejections.add(info.uri, reason)
    if not candidates:
        raise FileNotFoundError(f"no images found under {uri} (expected {uri}/train/NORMAL/x.jpeg ...)")
    index = dataset_layout.label_index(p.label_name for _, p in candidates)
    records = [ImageRecord(u, index[p.label_name], p.split, p.file_name) for u, p in sorted(candidates)]
    return _with_header_patients(records, patient_key), dataset_layout.invert_label_index(index)


def split_records(
    records: Sequence[ImageRecord], validation: str, val_fraction: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]:
    """(train, val, test) exactly as the Spark job splits (conf ``training.validation``):
    ``carve`` = a patient-grouped slice of the pooled ``train`` + ``val`` folders
    (``splits.carve_pool`` + ``splits.is_validation``, as ``training.assign_subsets``),
    ``folder`` = the dataset's own ``val`` folder. ``test`` is for the final report only."""
    test = [r for r in records if r.split == "test"]
    if validation == "folder":
        return [r for r in records if r.split == "train"], [r for r in records if r.split == "val"], test
    if validation != "carve":
        raise ValueError(f"validation must be carve or folder, got {validation!r}")
    pool = [r for r, pooled in zip(records, splits.carve_pool([r.split for r in records])) if pooled]
    flags = splits.is_validation([r.grouping_name() for r in pool], [r.label for r in pool], val_fraction, seed)
    train = [r for r, is_val in zip(pool, flags) if not is_val]
    val = [r for r, is_val in zip(pool, flags) if is_val]
    return train, val, test


def _parquet_files(uri: str) -> list[str]:
    from cxr_pipeline.infra import storage

    return [
        info.uri
        for info in storage.list_files(uri, recursive=True)
        if info.uri.endswith(".parquet") and "/_" not in info.uri[len(uri.rstrip("/")) :]
    ]


def _iter_table(table_file: str, columns: list[str], batch_size: int = 64):
    """Row batches (as dicts of lists) of one Parquet file read through storage."""
    import pyarrow.parquet as pq

    from cxr_pipeline.infra import storage

    parquet = pq.ParquetFile(io.BytesIO(storage.read_bytes(table_file)))
    present = [c for c in columns if c in parquet.schema_arrow.names]  # tables packed before a column existed
    for batch in parquet.iter_batches(batch_size=batch_size, columns=present):
        yield batch.to_pydict()


def list_image_table(uri: str, rejections: Rejections | None = None) -> tuple[list[ImageRecord], list[str]]:
    """The packed Parquet image table (``jobs/pack_images.py``: path, content, patient, ... partitioned
    by split) as records in table order; labels and splits come from each row's original path, the patient
    from the table's ``patient`` column (the keyed hash written at packing time for DICOM files)."""
    rejections = rejections if rejections is not None else Rejections()
    rows: list[tuple[str, dataset_layout.ImagePath, str, str | None]] = []
    for table_file in _parquet_files(uri):
        for batch in _iter_table(table_file, ["path", "patient"], batch_size=4096):
            for path, patient in zip(batch["path"], batch.get("patient") or [None] * len(batch["path"])):
                try:
                    rows.append((path, dataset_layout.parse_image_path(path), table_file, patient))
                except dataset_layout.LayoutError as exc:
                    rejections.add(path, f"outside the split/CLASS layout ({exc})")
    if not rows:
        raise FileNotFoundError(f"no image rows in the Parquet table at {uri}")
    index = dataset_layout.label_index(p.label_name for _, p, _, _ in rows)
    records = [ImageRecord(path, index[p.label_name], p.split, p.file_name, f, patient) for path, p, f, patient in rows]
    return records, dataset_layout.invert_label_index(index)


def is_image_table(uri: str) -> bool:
    """A packed Parquet image table: a ``.parquet`` path, or a folder whose files are Parquet."""
    return uri.rstrip("/").endswith(".parquet") or bool(_parquet_files(uri))


def load_splits(
    uri: str,
    validation: str,
    val_fraction: float,
    seed: int,
    source: str = "auto",
    patient_key: str | None = None,
) -> DataSplits:
    """``validation``, ``val_fraction``, ``seed``: ``training.validation``, ``.validation_fraction``, ``.seed``.
    ``source``: tree | parquet | auto (parquet when ``uri`` holds Parquet files).
    ``patient_key``: ``dicom.patient_key`` of the run's config (the Spark job's key, so both carve alike)."""
    rejections = Rejections()
    table = source == "parquet" or (source == "auto" and is_image_table(uri))
    if table:
        records, label_names = list_image_table(uri, rejections)
    else:
        records, label_names = list_image_tree(uri, rejections, patient_key)
    train, val, test = split_records(records, validation, val_fraction, seed)
    if not train:
        raise ValueError(f"{uri} has no training images (train/<CLASS>/...)")
    return DataSplits(train, val, test, label_names, rejections)


# ------------------------------------------------------------------ decoding


def _read_remote(uri: bytes, rejections: Rejections) -> bytes:
    from cxr_pipeline.infra import storage

    try:
        return storage.read_bytes(uri.decode())
    except Exception as exc:  # recorded, the pipeline goes on
        rejections.add(uri.decode(), f"read failed: {type(exc).__name__}: {exc}")
        return b""


def _decoder(size: int, max_pixels: int | None, rejections: Rejections, intensity: str):
    from cxr_pipeline.images import decode as imaging

    max_pixels = imaging.configured_max_pixels(max_pixels)
    empty = np.zeros((size, size, 3), np.uint8)

    def decode(uri: bytes, data: bytes):
        if not data:  # unreadable: already recorded by the reader
            return empty, False
        try:
            image = imaging.decode_image(data, size=(size, size), max_pixels=max_pixels, intensity=intensity)
        except imaging.ImageDecodeError as exc:
            rejections.add(uri.decode(), str(exc))
            return empty, False
        return np.ascontiguousarray(image, dtype=np.uint8), True

    return decode


def decoded_dataset(
    records: Sequence[ImageRecord],
    image_size: int,
    rejections: Rejections,
    max_pixels: int | None = None,
    *,
    cache: str | None,
    intensity: str = "none",
) -> tf.data.Dataset:
    """``(image uint8 [S, S, 3], label float32)`` for each record that decodes, in order.

    ``max_pixels``: None = ``data.max_pixels``. ``cache``: "memory", a cache file path prefix, or None.
    ``intensity``: ``imaging.normalize_intensity``.
    Iterate it once with
    :func:`prepare` before training so the cache is complete and rejections known.
    """
    if not records:
        raise ValueError("no images to read")
    decode = _decoder(image_size, max_pixels, rejections, intensity)
    if any(r.table_file for r in records):
        return _finish(_table_rows(records).map(_decode_map(decode, image_size), num_parallel_calls=AUTOTUNE), cache)
    from cxr_pipeline.infra import storage

    uris = [r.uri for r in records]
    labels = np.array([r.label for r in records], np.float32)
    local = not any(storage.is_remote(u) for u in uris)
    sources = [str(storage.to_local_path(u)) for u in uris] if local else uris
    decode_one = _decode_map(decode, image_size)

    def load(source, uri, label):
        if local:
            data = tf.io.read_file(source)
        else:
            data = tf.numpy_function(lambda u: _read_remote(u, rejections), [source], tf.string, stateful=False)
        return decode_one(uri, data, label)

    ds = tf.data.Dataset.from_tensor_slices((sources, uris, labels))
    return _finish(ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=True), cache)


def _decode_map(decode, image_size: int):
    def decode_one(uri, data, label):
        image, ok = tf.numpy_function(decode, [uri, data], (tf.uint8, tf.bool), stateful=False)
        image.set_shape((image_size, image_size, 3))
        ok.set_shape(())
        return image, label, ok

    return decode_one


def _table_rows(records: Sequence[ImageRecord]) -> tf.data.Dataset:
    """(path, content, label) of the wanted rows, in record order (records are in table
    order), streaming one Parquet file at a time."""
    labels = {r.uri: float(r.label) for r in records}
    files = list(dict.fromkeys(r.table_file for r in records))

    def rows():
        for table_file in files:
            for batch in _iter_table(table_file, ["path", "content"]):
                for path, content in zip(batch["path"], batch["content"]):
                    if path in labels:
                        yield path, content, labels[path]

    spec = (tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.float32))
    return tf.data.Dataset.from_generator(rows, output_signature=spec)


def _finish(ds: tf.data.Dataset, cache: str | None) -> tf.data.Dataset:
    ds = ds.filter(_decoded_ok).map(_drop_flag)
    if cache == "memory":
        return ds.cache()
    if cache:
        return ds.cache(str(cache))
    return ds


def _decoded_ok(image, label, ok):
    return ok


def _drop_flag(image, label, ok):
    return image, label


def prepare(ds: tf.data.Dataset, records: Sequence[ImageRecord], rejections: Rejections) -> list[ImageRecord]:
    """One pass over ``ds`` (fills its cache); the records that survived decoding."""
    for _ in ds.batch(256).prefetch(2):
        pass
    rejected = rejections.uris()
    return [r for r in records if r.uri not in rejected]


def with_length(ds: tf.data.Dataset, n: int) -> tf.data.Dataset:
    """Declare the number of elements (known after :func:`prepare`) so Keras shows full progress bars."""
    return ds.apply(tf.data.experimental.assert_cardinality(n))


# ------------------------------------------------------------------ batching


def augmenter(rotation: float, shift: float, zoom: float, brightness: float, flip: bool, seed: int):
    """Radiograph-safe augmentation on uint8-range batches (``cnn.augment``): small rotation (fraction
    of a full turn), shift, zoom and brightness; horizontal flips only when asked
    (the heart is on the left)."""
    import keras
    from keras import layers

    steps = []
    if rotation:
        steps.append(layers.RandomRotation(rotation, fill_mode="nearest", seed=seed))
    if shift:
        steps.append(layers.RandomTranslation(shift, shift, fill_mode="nearest", seed=seed + 1))
    if zoom:
        steps.append(layers.RandomZoom(zoom, fill_mode="nearest", seed=seed + 2))
    if brightness:
        steps.append(layers.RandomBrightness(brightness, value_range=(0, 255), seed=seed + 3))
    if flip:
        steps.append(layers.RandomFlip("horizontal", seed=seed + 4))
    return keras.Sequential(steps, name="augmentation") if steps else None


def _to_float(images, labels):
    return tf.cast(images, tf.float32), labels


def _has_label(c: int):
    def keep(image, label):
        return tf.equal(label, float(c))

    return keep


def training_dataset(
    decoded: tf.data.Dataset,
    labels: Sequence[int],
    batch_size: int,
    seed: int,
    augment,
    *,
    balance: str,
    shuffle_buffer: int,
) -> tuple[tf.data.Dataset, int | None]:
    """Shuffled, augmented (``augment``: an :func:`augmenter` or None), batched, prefetched; returns
    (dataset, steps_per_epoch). ``seed``, ``balance``, ``shuffle_buffer``: ``training.seed``, ``cnn.balance``,
    ``cnn.shuffle_buffer``.

    ``balance="oversample"`` draws both classes with equal probability from two
    repeated streams (steps_per_epoch then says where an epoch ends); otherwise
    one pass per epoch and steps_per_epoch is None.
    """
    n = len(labels)
    steps = None
    if balance == "oversample" and len(set(labels)) > 1:
        per_class = [decoded.filter(_has_label(c)).shuffle(shuffle_buffer, seed=seed + c).repeat() for c in (0, 1)]
        ds = tf.data.Dataset.sample_from_datasets(per_class, weights=[0.5, 0.5], seed=seed)
        steps = max(1, n // batch_size)
    else:
        ds = decoded.shuffle(min(shuffle_buffer, max(n, 1)), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(_to_float, num_parallel_calls=AUTOTUNE)
    if augment is not None:

        def augment_batch(images, labels):
            return augment(images, training=True), labels

        ds = ds.map(augment_batch, num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE), steps


def eval_dataset(decoded: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    return decoded.batch(batch_size).map(_to_float, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def labels_of(decoded: tf.data.Dataset) -> np.ndarray:
    return np.concatenate([y.numpy() for _, y in decoded.batch(1024)]).astype(np.int64) if decoded else np.zeros(0)


def images_from_bytes(blobs: Iterable[bytes], image_size: int, max_pixels: int | None, intensity: str):
    """Decode for prediction: (uint8 batch of the good ones, good indexes, [(index, reason)]);
    ``max_pixels``: None = ``data.max_pixels``."""
    from cxr_pipeline.images import decode as imaging

    max_pixels = imaging.configured_max_pixels(max_pixels)
    good, idx, bad = [], [], []
    for i, data in enumerate(blobs):
        try:
            good.append(
                imaging.decode_image(data, size=(image_size, image_size), max_pixels=max_pixels, intensity=intensity)
            )
            idx.append(i)
        except imaging.ImageDecodeError as exc:
            bad.append((i, str(exc)))
    batch = np.stack(good) if good else np.zeros((0, image_size, image_size, 3), np.uint8)
    return batch, idx, bad
