"""The ``serving`` section of the config: the service's address, limits and load settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import config as cfg
from .guards import BodyPace
from .validation import MIB


@dataclass(frozen=True)
class ServingSettings:
    """``serving.*`` from the loaded config; ``conf/defaults.yaml`` holds every default."""

    host: str
    port: int
    max_upload_mb: float
    keep_uploads: bool
    upload_dir: str | None
    upload_quota_mb: float
    max_batch: int
    max_active: int
    max_queued: int
    max_receiving: int
    body_grace_s: float
    body_min_kb_s: float
    max_heatmaps: int
    retry_after_s: int
    allowed_hosts: list[str]

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, **overrides: Any) -> ServingSettings:
        """From a loaded config (``None``: the defaults); keyword arguments that are not None win."""
        return cfg.section_settings(cls, cfg.load_config() if config is None else config, "serving", **overrides)

    def validate(self) -> None:
        if self.keep_uploads and not self.upload_dir:
            raise cfg.ConfigError("serving.keep_uploads is on but serving.upload_dir is not set")
        for name, low in (("max_upload_mb", 0), ("upload_quota_mb", 0), ("body_grace_s", 0), ("body_min_kb_s", 0)):
            if not float(getattr(self, name)) > low:
                raise cfg.ConfigError(f"serving.{name} must be > {low}, got {getattr(self, name)!r}")
        for name, low in (
            ("max_batch", 1),
            ("max_active", 1),
            ("max_queued", 0),
            ("max_receiving", 1),
            ("max_heatmaps", 1),
            ("retry_after_s", 1),
        ):
            if int(getattr(self, name)) < low:
                raise cfg.ConfigError(f"serving.{name} must be >= {low}, got {getattr(self, name)!r}")
        if isinstance(self.allowed_hosts, str) or not self.allowed_hosts:
            raise cfg.ConfigError("serving.allowed_hosts must be a non-empty list of host names ('*' = any)")

    @property
    def max_bytes(self) -> int:
        return int(float(self.max_upload_mb) * MIB)

    @property
    def max_admitted(self) -> int:
        return int(self.max_active) + int(self.max_queued)

    @property
    def pace(self) -> BodyPace:
        return BodyPace(float(self.body_grace_s), float(self.body_min_kb_s) * 1024)
