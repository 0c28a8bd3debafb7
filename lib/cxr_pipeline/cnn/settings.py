"""The ``cnn:`` section of ``conf/defaults.yaml`` as typed settings (no Keras import: the config test reads it).

Built by ``config.section_settings`` like every settings class: each field is a key of the section, an
unknown key is refused, a missing one is a ConfigError naming it; the nested mappings (``augment``,
``reduce_lr``, ``inception``, ``fine_tune``) are settings classes of their own, checked the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cxr_pipeline import config as cfg

MODEL_NAMES = ("small_cnn", "inception_v3")
DEFAULT_IMAGE_SIZE = {"small_cnn": 150, "inception_v3": 299}  # cnn.image_size null: the model's own input side
BALANCE_MODES = ("class_weight", "oversample", "none")
CACHE_MODES = ("memory", "disk", "none")
AUGMENT_PLACES = ("auto", "model", "pipeline")
SWITCHES = ("auto", True, False)  # cnn.mixed_precision, cnn.xla


@dataclass(frozen=True)
class AugmentSettings:
    """``cnn.augment``: random rotation (fraction of a turn), shift, zoom, brightness, horizontal flip."""

    rotation: float
    shift: float
    zoom: float
    brightness: float
    flip: bool


@dataclass(frozen=True)
class ReduceLrSettings:
    """``cnn.reduce_lr``: Keras ReduceLROnPlateau on the monitored AUC."""

    patience: int
    factor: float
    min_lr: float


@dataclass(frozen=True)
class InceptionSettings:
    """``cnn.inception``: the InceptionV3 transfer model."""

    weights: str | None  # None: the provisioned default (make weights)
    feature_layer: str  # the backbone's last block, the layer the featurizer pools (featurizer.feature_layer)
    dense_units: int
    dropout: float


@dataclass(frozen=True)
class FineTuneSettings:
    """``cnn.fine_tune``: phase 2, the top Inception blocks unfrozen."""

    epochs: int
    blocks: int
    learning_rate: float


@dataclass(frozen=True)
class CnnSettings:
    """The ``cnn:`` section of ``conf/defaults.yaml`` (the one home of its defaults)."""

    model: str
    image_size: int | None  # None: DEFAULT_IMAGE_SIZE of the model
    batch_size: int
    epochs: int
    learning_rate: float
    balance: str
    cache: str
    shuffle_buffer: int
    augment: AugmentSettings | None  # None (cnn.augment null or {}): no augmentation
    augment_on: str
    early_stopping_patience: int
    reduce_lr: ReduceLrSettings
    inception: InceptionSettings
    fine_tune: FineTuneSettings
    mixed_precision: Any  # auto | true | false
    xla: Any  # auto | true | false
    verbose: int
    runtime: str  # what scores the saved model (cnn.json); training and its evaluation are Keras
    precision: str

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CnnSettings:
        augment = cfg.require(config, "cnn.augment")
        return cfg.section_settings(
            cls,
            config,
            "cnn",
            augment=cfg.section_settings(AugmentSettings, config, "cnn.augment") if augment else None,
            reduce_lr=cfg.section_settings(ReduceLrSettings, config, "cnn.reduce_lr"),
            inception=cfg.section_settings(InceptionSettings, config, "cnn.inception"),
            fine_tune=cfg.section_settings(FineTuneSettings, config, "cnn.fine_tune"),
        )

    def validate(self) -> None:
        cfg.require_choice(self.model, MODEL_NAMES, "cnn.model")
        cfg.require_choice(self.balance, BALANCE_MODES, "cnn.balance")
        cfg.require_choice(self.cache, CACHE_MODES, "cnn.cache")
        cfg.require_choice(self.augment_on, AUGMENT_PLACES, "cnn.augment_on")
        cfg.require_choice(self.mixed_precision, SWITCHES, "cnn.mixed_precision")
        cfg.require_choice(self.xla, SWITCHES, "cnn.xla")
        cfg.require_choice(self.verbose, (0, 1, 2), "cnn.verbose")
        from cxr_pipeline.models import backbones

        try:
            backbones.check_runtime(self.runtime, self.precision)
        except backbones.BackboneError as exc:
            raise cfg.ConfigError(f"cnn.runtime/cnn.precision: {exc}") from None
        for name in ("batch_size", "epochs", "shuffle_buffer"):
            if int(getattr(self, name)) < 1:
                raise cfg.ConfigError(f"cnn.{name} must be >= 1, got {getattr(self, name)!r}")

    @property
    def input_size(self) -> int:
        """The square input side: ``image_size``, else the model's own."""
        return int(self.image_size or DEFAULT_IMAGE_SIZE[self.model])
