"""Which WebHDFS serves a NameNode, and the ``hdfs:`` settings storage runs with.

The WebHDFS URL of a NameNode is, first found wins: one registered with :func:`register_webhdfs` (the
local HDFS instances register themselves), ``$CXR_WEBHDFS_URL``, ``hdfs.webhdfs_url`` of the config
(when the URI's NameNode is the config's ``hdfs.namenode_uri``), else ``http://<host>:9870``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlparse

from .uris import _split

DEFAULT_WEBHDFS_PORT = 9870
_registered_webhdfs: dict[str, str] = {}


@dataclass(frozen=True)
class HdfsSettings:
    """The ``hdfs:`` section of ``conf/defaults.yaml`` (the one home of its defaults): every key required."""

    namenode_uri: str
    webhdfs_url: str | None
    user: str | None  # None: $HADOOP_USER_NAME, else the OS user
    datanode_attempts: int
    datanode_backoff_s: float

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> HdfsSettings:
        from ... import config as cfg

        return cfg.section_settings(cls, config, "hdfs")

    def validate(self) -> None:
        DatanodeRetry.from_settings(self)


_active: HdfsSettings | None = None


def register_webhdfs(namenode_uri: str, webhdfs_url: str) -> None:
    """Tell storage which WebHDFS URL serves ``namenode_uri`` (e.g. a second local HDFS on other ports)."""
    _registered_webhdfs[_authority(namenode_uri)] = webhdfs_url.rstrip("/")


def configure(config: Mapping[str, Any] | None) -> None:
    """Use a job's loaded config (its ``hdfs`` section, with --set overrides) instead of conf/ defaults."""
    global _active
    _active = HdfsSettings.from_config(config) if config is not None else None


def hdfs_settings() -> HdfsSettings:
    """The ``hdfs`` settings storage runs with: the configured job's, else the process's config."""
    return _active if _active is not None else _default_settings()


@lru_cache(maxsize=1)
def _default_settings() -> HdfsSettings:
    from ... import config as cfg

    return HdfsSettings.from_config(cfg.default_config())


@dataclass(frozen=True)
class DatanodeRetry:
    """How often a WebHDFS create/read goes back to the NameNode when its DataNode fails: ``hdfs.datanode_*``."""

    attempts: int
    backoff_s: float

    @classmethod
    def from_settings(cls, settings: HdfsSettings) -> DatanodeRetry:
        from ...config import ConfigError

        try:
            retry = cls(int(settings.datanode_attempts), float(settings.datanode_backoff_s))
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                "hdfs.datanode_attempts and hdfs.datanode_backoff_s must be numbers "
                f"(conf/defaults.yaml sets them): {exc}"
            ) from exc
        if retry.attempts < 1 or retry.backoff_s < 0:
            raise ConfigError(f"hdfs.datanode_attempts must be >= 1 and hdfs.datanode_backoff_s >= 0, not {retry}")
        return retry

    @classmethod
    def from_config(cls, hdfs: Mapping[str, Any]) -> DatanodeRetry:
        """From an ``hdfs`` section; the keys it lacks are the process's configured ones."""
        given = {key: hdfs[key] for key in ("datanode_attempts", "datanode_backoff_s") if key in hdfs}
        return cls.from_settings(dataclasses.replace(hdfs_settings(), **given))

    def pause(self, failed_attempt: int) -> float:
        return self.backoff_s * 2 ** (failed_attempt - 1)


def _authority(uri: str) -> str:
    netloc = _split(uri).netloc
    if netloc:
        return netloc.lower()
    default = hdfs_settings().namenode_uri
    netloc = urlparse(default).netloc.lower()
    if not netloc:
        raise ValueError(f"{uri} has no NameNode host and the config's hdfs.namenode_uri ({default}) gives none")
    return netloc


def webhdfs_url_for(uri: str) -> str:
    authority = _authority(uri)
    if authority in _registered_webhdfs:
        return _registered_webhdfs[authority]
    if os.environ.get("CXR_WEBHDFS_URL"):
        return os.environ["CXR_WEBHDFS_URL"].rstrip("/")
    conf = hdfs_settings()
    conf_nn, conf_url = conf.namenode_uri, conf.webhdfs_url
    if conf_url and conf_nn and urlparse(conf_nn).netloc.lower() in (authority, ""):
        return str(conf_url).rstrip("/")
    host = authority.rsplit(":", 1)[0] if ":" in authority else authority
    return f"http://{host}:{DEFAULT_WEBHDFS_PORT}"
