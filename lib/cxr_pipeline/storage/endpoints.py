"""Which WebHDFS serves a NameNode, and the ``hdfs:`` settings storage runs with.

The WebHDFS URL of a NameNode is, first found wins: one registered with :func:`register_webhdfs` (the
local HDFS instances register themselves), ``$CXR_WEBHDFS_URL``, ``hdfs.webhdfs_url`` of the config
(when the URI's NameNode is the config's ``hdfs.namenode_uri``), else ``http://<host>:9870``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlparse

from .uris import _split

DEFAULT_WEBHDFS_PORT = 9870
_registered_webhdfs: dict[str, str] = {}
_active_config: dict[str, Any] | None = None


def register_webhdfs(namenode_uri: str, webhdfs_url: str) -> None:
    """Tell storage which WebHDFS URL serves ``namenode_uri`` (e.g. a second local HDFS on other ports)."""
    _registered_webhdfs[_authority(namenode_uri)] = webhdfs_url.rstrip("/")


def configure(config: Mapping[str, Any] | None) -> None:
    """Use a job's loaded config (its ``hdfs`` section, with --set overrides) instead of conf/ defaults."""
    global _active_config
    _active_config = dict(config.get("hdfs") or {}) if config is not None else None


def _hdfs_config() -> dict[str, Any]:
    if _active_config is not None:
        return _active_config
    return _default_hdfs_config()


@lru_cache(maxsize=1)
def _default_hdfs_config() -> dict[str, Any]:
    from ..config import ConfigError, load_config

    try:
        return dict(load_config().get("hdfs") or {})
    except (ConfigError, OSError):
        return {}


@dataclass(frozen=True)
class DatanodeRetry:
    """How often a WebHDFS create/read goes back to the NameNode when its DataNode fails: ``hdfs.datanode_*``."""

    attempts: int
    backoff_s: float

    @classmethod
    def from_config(cls, hdfs: Mapping[str, Any]) -> DatanodeRetry:
        defaults = _default_hdfs_config()
        try:
            found = {
                key: hdfs.get(f"datanode_{key}", defaults.get(f"datanode_{key}")) for key in ("attempts", "backoff_s")
            }
            retry = cls(int(found["attempts"]), float(found["backoff_s"]))
        except (TypeError, ValueError) as exc:
            raise ValueError(
                "hdfs.datanode_attempts and hdfs.datanode_backoff_s must be numbers "
                f"(conf/defaults.yaml sets them): {exc}"
            ) from exc
        if retry.attempts < 1 or retry.backoff_s < 0:
            raise ValueError(f"hdfs.datanode_attempts must be >= 1 and hdfs.datanode_backoff_s >= 0, not {retry}")
        return retry

    def pause(self, failed_attempt: int) -> float:
        return self.backoff_s * 2 ** (failed_attempt - 1)


def _authority(uri: str) -> str:
    netloc = _split(uri).netloc
    if netloc:
        return netloc.lower()
    default = _hdfs_config().get("namenode_uri") or "hdfs://127.0.0.1:9000"
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
    conf = _hdfs_config()
    conf_nn, conf_url = conf.get("namenode_uri"), conf.get("webhdfs_url")
    if conf_url and conf_nn and urlparse(conf_nn).netloc.lower() in (authority, ""):
        return str(conf_url).rstrip("/")
    host = authority.rsplit(":", 1)[0] if ":" in authority else authority
    return f"http://{host}:{DEFAULT_WEBHDFS_PORT}"
