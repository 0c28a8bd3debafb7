"""Transfer: the bytes to staging (``hdfs dfs -put`` batches or WebHDFS threads), each file then placed."""

from __future__ import annotations

import dataclasses
import math
import os
import posixpath
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from .. import storage
from .remote import RemoteTree
from .scan import LocalFile, file_stamp
from .shared import AUTO_CLI_MIN_FILES, MIN_FILES_PER_CLI_BATCH, TRANSPORTS, SourceError

ProgressFn = Callable[[LocalFile], None]
# place(staged_rel, scanned, sent): move one staged file into place; ``sent`` has the size/MD5 that was sent.
PlaceFn = Callable[[str, LocalFile, LocalFile], None]


def choose_transport(via: str, n_files: int | None = None) -> str:
    """``auto``: ``hdfs dfs`` when one is available and there are enough files for its parallel JVM
    batches to pay off (measured: 2,000 small files 5.5x faster than one plain put, WebHDFS 3.8x;
    but for the 16-file sample one JVM takes ~10x longer than WebHDFS); else WebHDFS."""
    if via not in TRANSPORTS:
        raise SourceError(f"--via must be one of {', '.join(TRANSPORTS)}, not {via!r}")
    if via == "auto":
        big_enough = n_files is None or n_files >= AUTO_CLI_MIN_FILES
        return "cli" if big_enough and storage.find_hdfs_dfs_command() else "webhdfs"
    if via == "cli" and not storage.find_hdfs_dfs_command():
        raise SourceError("--via cli: no `hdfs` command on PATH and no provisioned scripts/hdfs (`make hadoop`)")
    return via


def upload_webhdfs(
    remote: RemoteTree, items: Sequence[tuple[LocalFile, str]], staging: str, place: PlaceFn, workers: int
) -> None:
    """Thread pool: each task streams one file to staging (hashing what it sends) and places it.

    On an error or Ctrl-C no new file is started; the ones in flight finish (they only
    write to staging or do one atomic rename)."""

    def task(f: LocalFile) -> None:
        staged = posixpath.join(staging, f.rel)
        size, md5 = remote.upload(f.path, staged)
        place(staged, f, dataclasses.replace(f, size=size, md5=md5))

    workers = max(1, workers)
    pool = ThreadPoolExecutor(max_workers=workers)
    in_flight: set = set()
    try:
        for f, _ in items:
            if len(in_flight) >= 2 * workers:  # bounded queue: an interrupt has little to cancel
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in done:
                    fut.result()
            in_flight.add(pool.submit(task, f))
        for fut in in_flight:
            fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def cli_batches(files: Sequence[LocalFile], workers: int) -> list[list[LocalFile]]:
    """About two batches per worker, so files reach their final names while other batches still copy,
    but never so small that a JVM start-up (~1.5 s) outweighs its files."""
    size = max(MIN_FILES_PER_CLI_BATCH, math.ceil(len(files) / (2 * max(1, workers))))
    return [list(files[i : i + size]) for i in range(0, len(files), size)]


def sent_by_cli(remote: RemoteTree, f: LocalFile, staged_rel: str) -> LocalFile:
    """What ``hdfs dfs -put`` sent: the scanned bytes when the file is untouched since the scan (same size,
    mtime, ctime and inode), else the staged copy itself, re-read from HDFS."""
    try:
        untouched = bool(f.stamp) and file_stamp(f.path.stat()) == f.stamp
    except OSError:
        untouched = False
    if untouched:
        return f
    size, md5 = remote.content_md5(staged_rel)
    return dataclasses.replace(f, size=size, md5=md5)


def upload_cli(
    remote: RemoteTree,
    items: Sequence[tuple[LocalFile, str]],
    staging: str,
    place: PlaceFn,
    workers: int,
    on_staged: Callable[[int], None] | None = None,
) -> None:
    """``hdfs dfs -put`` of batches (a symlink tree each, one JVM each, ``workers`` at a time) into
    staging; each batch's files are placed as soon as its JVM is done."""
    command = storage.find_hdfs_dfs_command()
    if command is None:
        raise SourceError("no `hdfs` command available for --via cli")
    batches = cli_batches([f for f, _ in items], workers)
    env = dict(os.environ, HADOOP_USER_NAME=remote.user)
    running: set[subprocess.Popen] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def run_batch(index: int, batch: list[LocalFile], tmp: Path) -> None:
        if stop.is_set():
            return
        local_root = tmp / f"b{index}"
        for f in batch:
            link = local_root / f.rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(f.path)
        staged_root = posixpath.join(staging, f"b{index}")
        proc = subprocess.Popen(
            [*command, "-put", "-f", str(local_root), remote.address.uri(staged_root)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        with lock:
            running.add(proc)
        try:
            _, stderr = proc.communicate()
        finally:
            with lock:
                running.discard(proc)
        if stop.is_set():
            return
        if proc.returncode != 0:
            raise storage.hadoop_command_error(stderr, "hdfs dfs -put", remote.address.namenode_uri)
        for f in batch:
            staged = posixpath.join(staged_root, f.rel)
            place(staged, f, sent_by_cli(remote, f, staged))

    with (
        tempfile.TemporaryDirectory(prefix="hdfs_load_") as tmp,
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
    ):
        futures = {pool.submit(run_batch, i, b, Path(tmp)) for i, b in enumerate(batches)}
        try:
            while futures:
                done, futures = wait(futures, timeout=1.0, return_when=FIRST_COMPLETED)
                for fut in done:
                    fut.result()
                if on_staged is not None and futures:
                    try:
                        on_staged(remote.staged_file_count(staging))
                    except OSError:
                        pass
        except BaseException:
            stop.set()
            for fut in futures:
                fut.cancel()
            with lock:
                for proc in running:
                    proc.terminate()
            raise
