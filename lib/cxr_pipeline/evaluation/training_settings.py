"""The ``training:`` section of ``conf/defaults.yaml``: the Spark classifier's options and the ones both
training paths share (the patient-grouped validation carve, its seed, the threshold rule; the CNN job reads
those from here too)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import config as cfg
from . import metrics as M

TUNING_MODES = ("none", "cv", "tvs")
VALIDATION_MODES = ("carve", "folder")


@dataclass
class TrainingSettings:
    """The ``training:`` section of ``conf/defaults.yaml`` (the one home of its defaults): every key required."""

    reg_param: float
    elastic_net_param: float
    max_iter: int
    class_weighting: bool
    tuning: str
    tuning_folds: int
    grid: dict[str, list[float]]
    validation: str
    validation_fraction: float
    seed: int
    target_sensitivity: float
    threshold_rule: str  # metrics.THRESHOLD_RULES
    cost_fn: float
    cost_fp: float
    fixed_threshold: float
    features_cache: str | None
    features_cache_lease_hours: float

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainingSettings:
        return cfg.section_settings(cls, config, "training")

    def validate(self) -> None:
        cfg.require_choice(self.tuning, TUNING_MODES, "training.tuning")
        if self.validation not in VALIDATION_MODES:
            raise cfg.ConfigError(f"training.validation must be carve or folder, got {self.validation!r}")
        if not 0.0 < float(self.validation_fraction) < 1.0:
            raise cfg.ConfigError("training.validation_fraction must be in (0, 1)")
        if not 0.0 < float(self.target_sensitivity) <= 1.0:
            raise cfg.ConfigError("training.target_sensitivity must be in (0, 1]")
        cfg.require_choice(self.threshold_rule, M.THRESHOLD_RULES, "training.threshold_rule")
        if min(float(self.cost_fn), float(self.cost_fp)) < 0 or float(self.cost_fn) + float(self.cost_fp) <= 0:
            raise cfg.ConfigError("training.cost_fn and training.cost_fp must be >= 0 and not both 0")
        if self.tuning == "cv" and int(self.tuning_folds) < 2:
            raise cfg.ConfigError("training.tuning_folds must be >= 2")

    def threshold_rule_args(self) -> dict[str, Any]:
        """Keyword arguments of ``metrics.choose_threshold_by_rule`` (the CNN job uses the same)."""
        return {
            "rule": self.threshold_rule,
            "target_sensitivity": float(self.target_sensitivity),
            "cost_fn": float(self.cost_fn),
            "cost_fp": float(self.cost_fp),
            "fixed": float(self.fixed_threshold),
        }
