"""Hadoop-style URIs: plain paths and ``file://`` are local, anything else (``hdfs://``, ``s3a://``) remote.

No query or fragment parsing: ``?`` and ``#`` are legal in file names.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path
from typing import NamedTuple

LOCAL_SCHEMES = ("", "file")


def is_remote(uri: str | os.PathLike) -> bool:
    """True for anything that is not the local filesystem (hdfs://, s3a://, ...)."""
    return _scheme(uri) not in LOCAL_SCHEMES


def join(uri: str | os.PathLike, *parts: str) -> str:
    """``join("hdfs://nn:9000/data", "train", "x.jpeg")`` -> ``"hdfs://nn:9000/data/train/x.jpeg"``."""
    base = os.fspath(uri)
    cleaned = [str(p).strip("/") for p in parts if str(p).strip("/")]
    if not cleaned:
        return base
    if not base:
        return "/".join(cleaned)
    return base.rstrip("/") + "/" + "/".join(cleaned)


def hadoop_uri(uri: str | os.PathLike) -> str:
    """The form Spark/Hadoop report paths in (e.g. binaryFile's ``path``): local -> ``file:/abs/path``.

    Use it to compare storage URIs with paths coming back from Spark.
    """
    text = os.fspath(uri)
    parts = _split(text)
    if parts.scheme in LOCAL_SCHEMES:
        return f"file:{to_local_path(text).resolve()}"
    return f"{parts.scheme}://{parts.netloc}{_clean_path(parts.path)}"


def to_local_path(uri: str | os.PathLike) -> Path:
    """The local path of a plain path or ``file://`` URI; ValueError for remote URIs."""
    text = os.fspath(uri)
    parts = _split(text)
    if parts.scheme == "":
        return Path(text)
    if parts.scheme != "file":
        raise ValueError(f"{text} is not a local path (scheme {parts.scheme}://)")
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"{text}: file:// URIs with a host are not supported")
    return Path(parts.path)


class _UriParts(NamedTuple):
    scheme: str
    netloc: str
    path: str


_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(?://([^/]*))?(.*)$", re.DOTALL)


def _split(text: str) -> _UriParts:
    """Hadoop-style URI split: ``scheme://authority/path`` or ``scheme:/path``; no query/fragment
    parsing, since ``?`` and ``#`` are legal in file names."""
    match = _URI.match(text)
    if not match:
        return _UriParts("", "", text)
    return _UriParts(match.group(1).lower(), match.group(2) or "", match.group(3) or "/")


def _clean_path(path: str) -> str:
    return posixpath.normpath("/" + path.lstrip("/"))


def _scheme(uri: str | os.PathLike) -> str:
    return _split(os.fspath(uri)).scheme


def _check_supported(uri: str) -> str:
    scheme = _scheme(uri)
    if scheme not in LOCAL_SCHEMES + ("hdfs",):
        raise ValueError(f"{uri}: storage handles plain paths, file:// and hdfs:// (Spark reads {scheme}:// directly)")
    return scheme
