"""Training the CNN: devices and distribution strategy, fit with callbacks, the
optional fine-tuning phase, evaluation and the run folder.

The same call runs on CPU or on every local GPU: GPU-only settings (memory
growth, mixed precision, XLA, ``MirroredStrategy``) switch on only when
``tf.config.list_physical_devices("GPU")`` is non-empty (or when forced in conf).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cxr_pipeline import config as config_mod
from cxr_pipeline.evaluation import metrics as M
from cxr_pipeline.evaluation import reporting
from cxr_pipeline.evaluation.training_settings import TrainingSettings
from cxr_pipeline.images import decode as imaging
from cxr_pipeline.images.dicom import PUBLISHED_KEY_WARNING, DicomSettings

from . import data, models, run_outputs
from .settings import CnnSettings

# Keras' AUC bins scores on 200 evenly spaced thresholds: a confident model whose
# scores all sit above 0.995 would read 0.5. Logit-spaced thresholds resolve both ends.
AUC_THRESHOLDS = [float(t) for t in 1 / (1 + np.exp(-np.linspace(-12, 12, 601)))]


def log(message: str) -> None:
    print(f"[train_cnn] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ devices


@dataclass
class Devices:
    gpus: list[str]
    strategy_name: str
    replicas: int
    mixed_precision: bool
    xla: bool

    def describe(self) -> str:
        where = f"{len(self.gpus)} GPU(s): {', '.join(self.gpus)}" if self.gpus else "CPU only (no GPU found)"
        return (
            f"devices: {where}; strategy {self.strategy_name} x{self.replicas}; "
            f"mixed precision {'on' if self.mixed_precision else 'off'}; XLA {'on' if self.xla else 'off'}"
        )


def _switch(value: Any, has_gpu: bool) -> bool:
    return has_gpu if value == "auto" else bool(value)


def configure_devices(mixed_precision: Any, xla: Any):
    """(Devices, tf.distribute.Strategy). Must run before any model or tensor is made."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as exc:  # already initialised by an earlier call in this process
            log(f"memory growth not set on {gpu.name}: {exc}")
    has_gpu = bool(gpus)
    use_mp = _switch(mixed_precision, has_gpu)
    keras.mixed_precision.set_global_policy("mixed_float16" if use_mp else "float32")
    strategy = tf.distribute.MirroredStrategy() if has_gpu else tf.distribute.get_strategy()
    devices = Devices(
        gpus=[g.name for g in gpus],
        strategy_name=type(strategy).__name__,
        replicas=strategy.num_replicas_in_sync,
        mixed_precision=use_mp,
        xla=_switch(xla, has_gpu),
    )
    return devices, strategy


# ------------------------------------------------------------------ settings


@dataclass
class Settings:
    """What train_and_evaluate needs: the ``cnn:`` section, the ``training:`` keys both paths share (validation
    carve, seed, threshold rule) and ``data.max_pixels`` / ``data.intensity``. conf/defaults.yaml holds every
    default; a missing key is a ConfigError naming it."""

    cnn: CnnSettings
    training: TrainingSettings
    max_pixels: int
    intensity: str  # data.intensity (imaging.normalize_intensity), saved in cnn.json for prediction

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Settings:
        intensity = config_mod.require(config, "data.intensity")
        return cls(
            cnn=CnnSettings.from_config(config),
            training=TrainingSettings.from_config(config),
            max_pixels=int(config_mod.require(config, "data.max_pixels")),
            intensity=str(config_mod.require_choice(intensity, imaging.INTENSITY_MODES, "data.intensity")),
        )

    model = property(lambda self: self.cnn.model)
    image_size = property(lambda self: self.cnn.input_size)
    batch_size = property(lambda self: int(self.cnn.batch_size))
    epochs = property(lambda self: int(self.cnn.epochs))
    learning_rate = property(lambda self: float(self.cnn.learning_rate))
    balance = property(lambda self: self.cnn.balance)
    cache = property(lambda self: self.cnn.cache)
    shuffle_buffer = property(lambda self: int(self.cnn.shuffle_buffer))
    early_stopping_patience = property(lambda self: int(self.cnn.early_stopping_patience))
    verbose = property(lambda self: int(self.cnn.verbose))
    runtime = property(lambda self: self.cnn.runtime)
    precision = property(lambda self: self.cnn.precision)
    seed = property(lambda self: int(self.training.seed))
    validation = property(lambda self: self.training.validation)
    validation_fraction = property(lambda self: float(self.training.validation_fraction))
    target_sensitivity = property(lambda self: float(self.training.target_sensitivity))

    @property
    def threshold_rule(self) -> dict[str, Any]:
        """metrics.choose_threshold_by_rule keyword arguments."""
        return self.training.threshold_rule_args()


def _model_options(settings: Settings) -> dict[str, Any]:
    """models.build_model keyword arguments of the configured model."""
    return asdict(settings.cnn.inception) if settings.model == "inception_v3" else {}


# ------------------------------------------------------------------ callbacks


class EpochTimer(keras.callbacks.Callback):
    """Seconds and training images/s of every epoch."""

    def __init__(self, n_images: int):
        super().__init__()
        self.n_images = n_images
        self.seconds: list[float] = []
        self.images_per_s: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        elapsed = time.perf_counter() - self._start
        self.seconds.append(round(elapsed, 3))
        self.images_per_s.append(round(self.n_images / elapsed, 2) if elapsed else 0.0)


def make_callbacks(checkpoint_path: Path, settings: Settings, has_val: bool, best_so_far: float | None = None):
    reduce_lr = settings.cnn.reduce_lr
    monitor = "val_auc" if has_val else "auc"
    return [
        keras.callbacks.ModelCheckpoint(
            str(checkpoint_path),
            monitor=monitor,
            mode="max",
            save_best_only=True,
            initial_value_threshold=best_so_far,
            verbose=0,
        ),
        keras.callbacks.EarlyStopping(
            monitor=monitor,
            mode="max",
            patience=settings.early_stopping_patience,
            restore_best_weights=True,
        ),
        keras.callbacks.ReduceLROnPlateau(
            monitor=monitor,
            mode="max",
            factor=float(reduce_lr.factor),
            patience=int(reduce_lr.patience),
            min_lr=float(reduce_lr.min_lr),
            verbose=1,
        ),
    ]


def compile_model(model, learning_rate: float, jit_compile: bool) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="binary_crossentropy",
        metrics=[
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.AUC(name="auc", thresholds=AUC_THRESHOLDS),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
        ],
        jit_compile=bool(jit_compile),
    )


def class_weights(counts: list[int]) -> dict[int, float] | None:
    weights = M.inverse_frequency_weights(counts)
    return {i: float(w) for i, w in enumerate(weights) if counts[i] > 0} if all(counts) else None


# ------------------------------------------------------------------ evaluation


def _report(y: np.ndarray, p: np.ndarray, threshold: float, label_names: list[str]) -> dict[str, Any]:
    report = M.binary_report(y, p, threshold)
    cm = M.confusion_matrix(y, M.predict_at(p, threshold))
    return {
        **report.to_dict(),
        "recall": report.sensitivity,
        "confusion_matrix": cm.tolist(),
        "label_names": label_names,
    }


def evaluate(y: np.ndarray, p: np.ndarray, threshold: float, label_names: list[str]) -> dict[str, Any]:
    """AUC + reports at 0.5 and at the validation-chosen threshold."""
    return {
        "n": int(y.size),
        "class_counts": M.class_counts(y),
        "auc": M.roc_auc(y, p),
        "average_precision": M.average_precision(y, p),
        "at_0.5": _report(y, p, M.DEFAULT_THRESHOLD, label_names),
        "at_threshold": _report(y, p, threshold, label_names),
    }


def predict_scores(model, ds) -> np.ndarray:
    if ds is None:
        return np.zeros(0)
    return np.asarray(model.predict(ds, verbose=0), dtype=np.float64).ravel()


# ------------------------------------------------------------------ run


def _cache_spec(cache: str, scratch: Path, name: str) -> str | None:
    if cache == "memory":
        return "memory"
    if cache == "disk":
        return str(scratch / f"cache_{name}")
    return None


@dataclass
class Split:
    """One split, decoded and cached: the dataset (None when empty) and its surviving records."""

    ds: Any
    records: list

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], np.int64)


@dataclass
class Prepared:
    train: Split
    val: Split
    test: Split
    label_names: list[str]
    rejections: data.Rejections
    decode_seconds: float
    warnings: list[str]  # metrics.json "warnings"

    def counts(self) -> dict[str, list[int]]:
        return {name: data.class_counts(getattr(self, name).records) for name in ("train", "val", "test")}


def _decoded(records, settings: Settings, rejections, scratch: Path, name: str) -> Split:
    if not records:
        return Split(None, [])
    ds = data.decoded_dataset(
        records,
        settings.image_size,
        rejections,
        settings.max_pixels,
        cache=_cache_spec(settings.cache, scratch, name),
        intensity=settings.intensity,
    )
    good = data.prepare(ds, records, rejections)
    return Split(data.with_length(ds, len(good)) if good else None, good)


def prepare_data(config: Mapping[str, Any], settings: Settings, data_uri: str, scratch: Path) -> Prepared:
    """List, split, decode and cache every split once; rejections are known afterwards."""
    started = time.perf_counter()
    source = "parquet" if config_mod.require(config, "data.source") == "parquet" else "auto"
    dicom = DicomSettings.from_config(config)
    splits = data.load_splits(
        data_uri,
        settings.validation,
        settings.validation_fraction,
        settings.seed,
        source,
        patient_key=dicom.patient_key,
    )
    warnings = []
    # pseudonyms were made here from DICOM headers (a packed table's were made when it was packed)
    header_patients = any(r.patient for r in (*splits.train, *splits.val, *splits.test))
    if source != "parquet" and header_patients and dicom.uses_published_key():
        log(f"WARNING: {PUBLISHED_KEY_WARNING}")
        warnings.append(PUBLISHED_KEY_WARNING)
    log(
        f"listed {data_uri}: train {len(splits.train)}, val {len(splits.val)}, test {len(splits.test)} images; "
        f"{len(splits.rejections.items)} rejected while listing"
    )
    prepared = Prepared(
        *(
            _decoded(getattr(splits, name), settings, splits.rejections, scratch, name)
            for name in ("train", "val", "test")
        ),
        label_names=splits.label_names,
        rejections=splits.rejections,
        decode_seconds=round(time.perf_counter() - started, 2),
        warnings=warnings,
    )
    if not prepared.train.records:
        raise ValueError("no training image could be decoded (see rejected.csv)")
    log(
        f"decoded in {prepared.decode_seconds:.1f}s; class counts (NORMAL, PNEUMONIA) {prepared.counts()}; "
        f"{len(prepared.rejections.items)} rejected in all"
    )
    return prepared


def fit(
    config: Mapping[str, Any], settings: Settings, devices: Devices, strategy, prepared: Prepared, checkpoint: Path
):
    """Phase 1 (and the fine-tuning phase when configured); returns (best model, history, timer)."""
    batch = settings.batch_size * devices.replicas
    augment_conf = settings.cnn.augment
    augment = data.augmenter(**asdict(augment_conf), seed=settings.seed) if augment_conf else None
    in_model = augment is not None and augment_placement(settings.cnn.augment_on, devices) == "model"
    train_input, steps = data.training_dataset(
        prepared.train.ds,
        list(prepared.train.labels),
        batch,
        settings.seed,
        None if in_model else augment,
        balance=settings.balance,
        shuffle_buffer=settings.shuffle_buffer,
    )
    val_input = data.eval_dataset(prepared.val.ds, batch) if prepared.val.ds is not None else None
    weights = class_weights(prepared.counts()["train"]) if settings.balance == "class_weight" else None
    with strategy.scope():
        options = _model_options(settings)
        model = models.build_model(settings.model, settings.image_size, **options)
        # Augmenting inside the trained graph runs it on the accelerator; the saved model stays bare.
        trained = keras.Sequential([keras.Input(model.input_shape[1:]), augment, model]) if in_model else model
        compile_model(trained, settings.learning_rate, devices.xla)
    log(
        f"model {model.name}: {models.trainable_summary(model)} parameters; batch {batch}; class weights {weights}; "
        f"augmentation {'in the model' if in_model else 'in the input pipeline' if augment else 'off'}"
    )

    timer = EpochTimer(len(prepared.train.records) if steps is None else steps * batch)
    monitor = "val_auc" if val_input is not None else "auc"
    history: dict[str, list[float]] = {}

    def run_phase(epochs: int, best: float | None = None) -> None:
        done = len(history.get("loss", []))
        result = trained.fit(
            train_input,
            validation_data=val_input,
            epochs=done + epochs,
            initial_epoch=done,
            steps_per_epoch=steps,
            class_weight=weights,
            verbose=settings.verbose,
            shuffle=False,
            callbacks=[*make_callbacks(checkpoint, settings, val_input is not None, best), timer],
        )
        _merge_history(history, result.history)

    run_phase(settings.epochs)
    fine_tune = settings.cnn.fine_tune
    if settings.model == "inception_v3" and int(fine_tune.epochs) > 0:
        blocks = int(fine_tune.blocks)
        with strategy.scope():
            unfrozen = models.unfreeze_top_blocks(model, blocks)
            compile_model(trained, float(fine_tune.learning_rate), devices.xla)
        log(
            f"fine-tuning: {len(unfrozen)} layers of the top {blocks} blocks unfrozen, "
            f"{models.trainable_summary(model)}"
        )
        run_phase(int(fine_tune.epochs), best=max(history.get(monitor, [0.0])))

    if checkpoint.exists():  # the best epoch on validation AUC, over both phases
        with strategy.scope():
            best_model = keras.models.load_model(checkpoint)
        model = best_model.layers[-1] if in_model else best_model
    return model, history, timer


def augment_placement(setting: str, devices: Devices) -> str:
    """Where augmentation runs: "model" (on the accelerator) or "pipeline" (tf.data on the CPU).
    ``auto``: in the model when a GPU trains, so a few CPU cores cannot starve it."""
    if setting == "auto":
        return "model" if devices.gpus else "pipeline"
    if setting not in ("model", "pipeline"):
        raise ValueError(f"cnn.augment_on must be auto, model or pipeline, got {setting!r}")
    return setting


def evaluate_run(model, settings: Settings, devices: Devices, prepared: Prepared) -> tuple[dict, list]:
    """Threshold chosen on validation; reports on test (or validation when there is no test
    split). Returns (metrics without timings, [(used_as, record, probability)])."""
    batch = settings.batch_size * devices.replicas
    val = prepared.val
    val_p = predict_scores(model, data.eval_dataset(val.ds, batch) if val.ds is not None else None)
    choice = M.choose_threshold_by_rule(
        val.labels, val_p, **{"target_sensitivity": settings.target_sensitivity, **settings.threshold_rule}
    )
    threshold = choice.threshold
    scored = [("val", r, p) for r, p in zip(val.records, val_p)]
    eval_name, final = ("test", prepared.test) if prepared.test.records else ("val", val)
    final_p = val_p
    if eval_name == "test":
        final_p = predict_scores(model, data.eval_dataset(final.ds, batch))
        scored += [("test", r, p) for r, p in zip(final.records, final_p)]
    metrics = {
        "model": settings.model,
        "image_size": settings.image_size,
        "devices": asdict(devices),
        "evaluated_on": eval_name,
        "label_names": prepared.label_names,
        "class_counts": prepared.counts(),
        "rejected": len(prepared.rejections.items),
        "threshold": threshold,
        "threshold_choice": {**choice.to_dict(), "description": choice.describe()},
        "validation": evaluate(val.labels, val_p, threshold, prepared.label_names) if val.records else None,
        eval_name: evaluate(final.labels, final_p, threshold, prepared.label_names),
    }
    honest = reporting.honest_metrics(final.labels, final_p, {"at_threshold": threshold, "at_0.5": M.DEFAULT_THRESHOLD})
    metrics[eval_name].update(honest)
    return metrics, scored


def _merge_history(total: dict[str, list[float]], history: Mapping[str, list[float]]) -> None:
    for key, values in history.items():
        total.setdefault(key, []).extend(float(v) for v in values)


def train_and_evaluate(
    config: Mapping[str, Any], data_uri: str, out_uri: str, overwrite: bool = False
) -> dict[str, Any]:
    """Train the configured CNN on ``data_uri`` and write the run folder to ``out_uri`` (new or
    empty unless ``overwrite``). Returns the metrics dict written to ``metrics.json``."""
    from ..infra import run_folder

    run_folder.check_output(out_uri, overwrite)  # before the epochs, not after
    settings = Settings.from_config(config)
    devices, strategy = configure_devices(settings.cnn.mixed_precision, settings.cnn.xla)
    log(devices.describe())
    keras.utils.set_random_seed(settings.seed)
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="cxr_cnn_"))
    try:
        prepared = prepare_data(config, settings, data_uri, scratch)
        model, history, timer = fit(config, settings, devices, strategy, prepared, scratch / "best.keras")
        metrics, scored = evaluate_run(model, settings, devices, prepared)
        metrics.update(
            {
                "data": data_uri,
                "history": history,
                "epoch_seconds": timer.seconds,
                "train_images_per_s": timer.images_per_s,
                "decode_seconds": prepared.decode_seconds,
                "total_seconds": round(time.perf_counter() - started, 2),
                "warnings": prepared.warnings,
            }
        )
        stage = scratch / "run"
        stage.mkdir()
        model.save(stage / run_outputs.MODEL_FILE)
        if settings.model == "inception_v3":
            metrics["backbone"] = run_outputs.export_backbone(settings, model, stage)
        (stage / "predictions.csv").write_text(run_outputs.predictions_csv(scored))
        run_outputs.write_run(stage, config, settings, metrics, prepared, scored)
        run_outputs.write_outputs(stage, out_uri, overwrite)
        name = metrics["evaluated_on"]
        log(
            f"wrote {out_uri}: {name} AUC {M.fmt(metrics[name]['auc'])}, "
            f"accuracy@0.5 {M.fmt(metrics[name]['at_0.5']['accuracy'])}, threshold {metrics['threshold']:.3f} "
            f"({metrics['threshold_choice']['description']})"
        )
        for line in reporting.interval_lines(metrics[name]):
            log(line)
        return metrics
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
