"""Storage errors: the OSError subclasses every storage call raises, and what a Hadoop client's
stderr or an HdfsCLI error means."""

from __future__ import annotations


class StorageError(OSError):
    """A storage operation failed for a reason other than not-found/exists/unavailable."""


class StorageUnavailable(StorageError):
    """The storage service (e.g. the HDFS NameNode's WebHDFS endpoint) cannot be reached, or cannot write now."""


class StoragePermissionError(StorageError, PermissionError):
    """The storage service refused the operation for this user (HDFS ``AccessControlException``)."""


# What a Hadoop client or daemon reports when it cannot reach another one, including a
# DataNode's WebHDFS that lost the NameNode mid-request
# ("Failed on local exception: java.net.SocketException: Connection reset").
_LOST_PEER_MARKERS = (
    "ConnectException",
    "UnknownHostException",
    "Connection refused",
    "Connection reset",
    "Failed on local exception",
    "EOFException",
    "NoRouteToHostException",
    "SocketTimeoutException",
)


def is_lost_connection(error: BaseException | str) -> bool:
    """True if an HdfsCLI ``HdfsError`` (or a Hadoop client's stderr) says a Hadoop daemon was unreachable."""
    text = error if isinstance(error, str) else f"{getattr(error, 'exception', '') or ''} {error}"
    return any(marker in text for marker in _LOST_PEER_MARKERS)


def _is_safe_mode(text: str) -> bool:
    return "SafeModeException" in text or "RetriableException" in text or "safe mode" in text.lower()


def _is_permission_denied(text: str) -> bool:
    return "AccessControlException" in text or "Permission denied" in text


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def hadoop_command_error(stderr: str, what: str, namenode_uri: str = "HDFS") -> StorageError:
    """The error a failed ``hdfs dfs`` command means, from its stderr (``what``: e.g. ``"hdfs dfs -put"``)."""
    lines = [line for line in stderr.splitlines() if line.strip() and " WARN " not in line]
    tail = "\n".join(lines[-5:])
    if is_lost_connection(stderr):
        return StorageUnavailable(f"{namenode_uri} is unreachable ({what}): {tail}")
    if _is_safe_mode(stderr):
        return StorageUnavailable(f"{namenode_uri} is not writable, it is in safe mode ({what}): {tail}")
    if _is_permission_denied(stderr):
        return StoragePermissionError(f"permission denied on {namenode_uri} ({what}): {tail}")
    return StorageError(f"{what} failed: {tail}")
