"""Configuration: YAML files in ``conf/``, overridable from the command line.

``load_config("local", overrides=["featurizer.batch_size=16"])`` merges
``conf/defaults.yaml`` <- ``conf/<env>.yaml`` <- extra files <- ``key=value``
overrides (values parsed as YAML, so ``true``, ``0.5`` and ``[a, b]`` work).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from .paths import CONF_DIR


def environments(conf_dir: str | os.PathLike = CONF_DIR) -> tuple[str, ...]:
    """The ``--conf-env`` choices: every ``conf/<env>.yaml`` except ``defaults.yaml`` (local, standalone, yarn, gpu)."""
    return tuple(sorted(p.stem for p in Path(conf_dir).glob("*.yaml") if p.stem != "defaults"))


ENVIRONMENTS = environments()


class ConfigError(ValueError):
    pass


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """``"a.b.c=3"`` -> ``{"a": {"b": {"c": 3}}}``."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {text!r} has an empty key")
    value: Any = yaml.safe_load(raw) if raw.strip() else ""
    for key in reversed(keys):
        value = {key: value}
    return value


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: top level must be a mapping")
    return dict(data)


def load_config(
    env: str | None = None,
    files: Iterable[str | os.PathLike] = (),
    overrides: Iterable[str] = (),
    conf_dir: str | os.PathLike = CONF_DIR,
) -> dict[str, Any]:
    conf_dir = Path(conf_dir)
    env = env or os.environ.get("CXR_ENV", "local")
    config = read_yaml(conf_dir / "defaults.yaml") if (conf_dir / "defaults.yaml").exists() else {}
    env_file = conf_dir / f"{env}.yaml"
    if not env_file.exists():
        raise ConfigError(f"unknown environment {env!r}: no {env_file} (have: {', '.join(environments(conf_dir))})")
    config = deep_merge(config, read_yaml(env_file))
    for extra in files:
        config = deep_merge(config, read_yaml(extra))
    for text in overrides:
        config = deep_merge(config, parse_override(text))
    config["env"] = env
    return config


def section_settings(cls: type, config: Mapping[str, Any], section: str, **overrides: Any):
    """``cls(**config[section])`` for a dataclass whose fields are exactly the section's keys.

    conf/defaults.yaml is the one home of the defaults, so every key must be there: unknown keys are refused
    (a typo never passes silently), missing ones are named, keyword ``overrides`` that are not None win, and
    the instance's ``validate()`` runs when the class has one.
    """
    from dataclasses import fields

    values = dict(get(config, section, {}) or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown {section} option(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    missing = sorted(names - set(values))
    if missing:
        raise ConfigError(
            f"{section} option(s) missing from the config: {', '.join(missing)} (conf/defaults.yaml "
            "defines them all: is CXR_CONF_DIR pointing at an old copy?)"
        )
    settings = cls(**values)
    if hasattr(settings, "validate"):
        settings.validate()
    return settings


def require_choice(value: Any, choices: Sequence[Any], dotted: str) -> Any:
    """``value`` if it is one of ``choices``, else :class:`ConfigError` naming the setting and the choices.

    >>> require_choice("cv", ("none", "cv"), "training.tuning")
    'cv'
    """
    if value not in choices:
        raise ConfigError(f"{dotted} must be one of {tuple(choices)}, got {value!r}")
    return value


_MISSING = object()


def require(config: Mapping[str, Any], dotted: str) -> Any:
    """The value of the setting ``dotted`` (``"data.uri"``); :class:`ConfigError` naming it when the config lacks it.

    conf/defaults.yaml defines every setting, so a missing one means an old or partial config: it is never
    replaced by a second default in code.
    """
    value = get(config, dotted, _MISSING)
    if value is _MISSING:
        raise ConfigError(
            f"{dotted} is missing from the config (conf/defaults.yaml defines it: is CXR_CONF_DIR pointing at an "
            "old copy?)"
        )
    return value


@lru_cache(maxsize=1)
def default_config() -> dict[str, Any]:
    """The configuration a caller that passes no config gets (``load_config()``), read once per process."""
    return load_config()


def configured(dotted: str) -> Any:
    """:func:`require` on :func:`default_config`: the setting for a caller that passes no value of its own."""
    return require(default_config(), dotted)


def get(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


SECRET_WORDS = ("key", "token", "secret", "password")  # a setting whose name holds one of these is a secret
REDACTED = "<redacted>"


def is_secret(name: str) -> bool:
    return any(word in name.rsplit(".", 1)[-1].lower() for word in SECRET_WORDS)


def redact_secrets(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with secret values (``dicom.patient_key``, tokens, ...) replaced by ``<redacted>``."""
    return {
        key: redact_secrets(value)
        if isinstance(value, Mapping)
        else REDACTED
        if value is not None and is_secret(str(key))
        else value
        for key, value in config.items()
    }


def dump_config(config: Mapping[str, Any]) -> str:
    """YAML of the resolved config for a run folder; secrets redacted (run folders are shared, keys are not)."""
    return yaml.safe_dump(redact_secrets(config), sort_keys=True)
