"""The load: scan, plan, transfer under the target's lock, record, verify (see the package docstring)."""

from __future__ import annotations

import os
import posixpath
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .checksum import LocalChecksums
from .lock import ACTIVE_RUNS, LockLease, Owner
from .plan import Plan, make_plan, merge_manifest
from .remote import RemoteTree, resolve_target
from .scan import LocalFile, LocalScan, scan_local_tree
from .shared import LOCK_NAME, MANIFEST_NAME, VERIFY_MODES, HdfsLoadSettings, SourceError, check_lease, parallel_map
from .transfer import ProgressFn, choose_transport, upload_cli, upload_webhdfs
from .verify import Mismatch, compare_content, content_problem, verify


@dataclass
class LoadReport:
    source: str
    target: str
    transport: str
    scan: LocalScan
    plan: Plan
    verify_mode: str
    placed: list[LocalFile] = field(default_factory=list)  # size and MD5 as sent
    not_replaced: list[tuple[str, str]] = field(default_factory=list)  # (rel, why): not ours, kept
    changed_during_upload: list[str] = field(default_factory=list)  # sent bytes differ from the scan's
    stale_staging_removed: list[str] = field(default_factory=list)
    staging_left_alone: list[str] = field(default_factory=list)  # no marker of ours, or its loader runs
    broken_lock: Owner | None = None
    lock_holder: Owner | None = None  # dry run: who holds the lock now
    mismatches: list[Mismatch] | None = None  # None: not verified (dry run)
    upload_seconds: float = 0.0
    total_seconds: float = 0.0
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return self.dry_run or (self.mismatches is not None and not self.mismatches)

    @property
    def uploaded_bytes(self) -> int:
        return sum(f.size for f in self.placed)


def load_tree(
    source: str | os.PathLike,
    target: str,
    *,
    via: str | None = None,
    workers: int | None = None,
    webhdfs_url: str | None = None,
    user: str | None = None,
    default_namenode: str | None = None,
    dry_run: bool = False,
    progress: bool = True,
    on_placed: ProgressFn | None = None,
    replace: bool = False,
    verify_mode: str | None = None,
    break_lock: bool = False,
    lock_lease_s: float | None = None,
) -> LoadReport:
    """Scan, plan, transfer (through staging, under the target's lock) and verify; see the module docstring.

    ``on_placed(file)`` is called after each file reaches its final name. ``replace``: overwrite files this
    tool did not write; ``verify_mode``: ``size``, ``crc`` or ``checksum``; ``break_lock``: remove the lock of
    a load that is gone; ``lock_lease_s``: how long an unrenewed lock from another host stays valid
    (``via``, ``workers``, ``verify_mode`` and ``lock_lease_s``: None = hdfs_load.via, .workers, .verify and
    .lock_lease_s of the configuration; ``default_namenode``, for an absolute-path target: None = hdfs.namenode_uri).
    Raises SourceError / TargetLocked / storage.StorageUnavailable / storage.StorageError.
    """
    started = time.monotonic()
    if None in (via, workers, verify_mode, lock_lease_s):
        settings = HdfsLoadSettings.configured()
        via = settings.via if via is None else via
        workers = settings.workers if workers is None else workers
        verify_mode = settings.verify if verify_mode is None else verify_mode
        lock_lease_s = settings.lock_lease_s if lock_lease_s is None else lock_lease_s
    choose_transport(via)  # a bad option fails before any work
    if verify_mode not in VERIFY_MODES:
        raise SourceError(f"--verify must be one of {', '.join(VERIFY_MODES)}, not {verify_mode!r}")
    lease_s = check_lease(lock_lease_s)
    scan = scan_local_tree(source, workers=workers)
    remote = RemoteTree(resolve_target(target, default_namenode, webhdfs_url), user=user)
    exists = remote.probe()
    checksums = LocalChecksums()
    if dry_run:
        report = _survey(remote, scan, exists, via, replace, verify_mode, workers, checksums)[0]
        report.dry_run = True
        report.lock_holder = remote.read_owner(LOCK_NAME) if exists else None
    else:
        owner = Owner.this_process(remote.user)
        ACTIVE_RUNS.add(owner.run_id)
        try:
            broken, clock_offset_ms = remote.acquire_lock(owner, break_lock, lease_s)
            try:
                with LockLease(remote, owner, lease_s, clock_offset_ms) as lease:
                    report = _load_locked(
                        remote, owner, lease, scan, via, workers, replace, verify_mode, checksums, progress, on_placed
                    )
            finally:
                remote.release_lock(owner)
            report.broken_lock = broken
        finally:
            ACTIVE_RUNS.discard(owner.run_id)
    report.total_seconds = time.monotonic() - started
    return report


@dataclass
class _Remote:
    """The target as the plan found it."""

    sizes: dict[str, int]
    staging: list[str]
    manifest: dict[str, dict[str, object]]
    has_manifest: bool


def read_marks(remote: RemoteTree, rels: Sequence[str], workers: int) -> dict[str, Mapping[str, object] | None]:
    """``{rel: the record on the file's mark, or None}``: read only for files the manifest does not record
    with their size (a load killed before it wrote the manifest, or files someone else put there)."""
    return dict(zip(rels, parallel_map(remote.read_mark, rels, workers)))


def _survey(
    remote: RemoteTree,
    scan: LocalScan,
    exists: bool,
    via: str,
    replace: bool,
    verify_mode: str,
    workers: int,
    checksums: LocalChecksums,
) -> tuple[LoadReport, _Remote]:
    """A report holding the plan, and the remote state it was made from."""
    sizes, staging, has_manifest = remote.list_tree() if exists else ({}, [], False)
    state = _Remote(sizes, staging, remote.read_manifest() if has_manifest else {}, has_manifest)
    same_size = [f for f in scan.files if sizes.get(f.rel) == f.size]
    content_equal = compare_content(remote, same_size, verify_mode, workers, checksums)
    unrecorded = [
        f.rel for f in scan.files if f.rel in sizes and (state.manifest.get(f.rel) or {}).get("size") != sizes[f.rel]
    ]
    marks = read_marks(remote, unrecorded, workers)
    plan = make_plan(scan.files, sizes, state.manifest, replace=replace, content_equal=content_equal, marks=marks)
    report = LoadReport(
        str(scan.root),
        remote.address.uri(),
        choose_transport(via, len(plan.to_upload)),
        scan,
        plan,
        verify_mode=verify_mode,
    )
    report.not_replaced = [(f.rel, why) for f, why in plan.kept_foreign]
    return report, state


def _load_locked(
    remote: RemoteTree,
    owner: Owner,
    lease: LockLease,
    scan: LocalScan,
    via: str,
    workers: int,
    replace: bool,
    verify_mode: str,
    checksums: LocalChecksums,
    progress: bool,
    on_placed: ProgressFn | None,
) -> LoadReport:
    report, state = _survey(remote, scan, True, via, replace, verify_mode, workers, checksums)
    stale, report.staging_left_alone = remote.sort_staging(state.staging)
    for name in stale:  # left by a killed load
        remote.delete(name, recursive=True)
        report.stale_staging_removed.append(name)
    staging = _upload(remote, owner, lease, report, workers, progress, on_placed) if report.plan.to_upload else None
    after, _, _ = remote.list_tree()
    lease.check()
    _record(remote, report, after, owner.run_id)
    if staging is not None:
        remote.delete(staging, recursive=True)
    content = None
    if verify_mode != "size":  # content once per file and run: what the plan found equal is not asked again
        compared = report.plan.same_content

        def content(f: LocalFile) -> str | None:
            return None if f.rel in compared else content_problem(remote, f, verify_mode, checksums)

    report.mismatches = verify(scan.files, after, content, workers)
    return report


def _upload(
    remote: RemoteTree,
    owner: Owner,
    lease: LockLease,
    report: LoadReport,
    workers: int,
    progress: bool,
    on_placed: ProgressFn | None,
) -> str:
    """Stage and place the plan's uploads; returns the staging folder (removed by the caller once the
    manifest is written). On an interruption, records what was placed and removes the staging folder."""
    from tqdm import tqdm

    plan = report.plan
    staging = remote.open_staging(owner)
    remote.makedirs(*sorted({posixpath.dirname(f.rel) for f, _ in plan.to_upload}))  # rename needs the parent
    bar = tqdm(
        total=len(plan.to_upload),
        unit="file",
        desc=f"upload ({report.transport})",
        disable=not progress,
        dynamic_ncols=True,
        leave=True,
    )
    lock = threading.Lock()

    def place(staged_rel: str, scanned: LocalFile, sent: LocalFile) -> None:
        lease.check()  # a load whose lock was broken places nothing more
        remote.mark(staged_rel, sent, owner.run_id)  # recorded before it is visible: no unrecorded instant
        if not remote.place(staged_rel, sent.rel, sent.rel in plan.replacing):
            with lock:
                report.not_replaced.append((sent.rel, "appeared on HDFS during the load"))
            return
        with lock:
            report.placed.append(sent)
            if (sent.size, sent.md5) != (scanned.size, scanned.md5):
                report.changed_during_upload.append(sent.rel)
        bar.update(1)
        if on_placed is not None:
            on_placed(sent)

    upload_started = time.monotonic()
    try:
        if report.transport == "cli":

            def staged(count: int) -> None:
                # The JVMs copy first (shown as "staged"); the bar itself counts files placed.
                bar.set_postfix_str(f"staged {count}/{len(plan.to_upload)}", refresh=True)

            upload_cli(remote, plan.to_upload, staging, place, workers, staged)
        else:
            upload_webhdfs(remote, plan.to_upload, staging, place, workers)
    except BaseException:
        bar.close()
        _save_progress(remote, report, staging, owner.run_id)
        raise
    bar.close()
    report.upload_seconds = time.monotonic() - upload_started
    return staging


def _record(remote: RemoteTree, report: LoadReport, remote_sizes: Mapping[str, int], run_id: str) -> None:
    """Merge this load's records into the manifest as it is now (read again: another writer's records stay);
    ``remote_sizes`` is a listing taken after the last placement."""
    has_manifest = remote.fs.exists(remote.path(MANIFEST_NAME))
    current = remote.read_manifest() if has_manifest else {}
    merged = merge_manifest(current, remote_sizes, report.placed, report.plan.adopted)
    if merged != current or not has_manifest:
        remote.write_manifest(merged, run_id)


def _save_progress(remote: RemoteTree, report: LoadReport, staging: str, run_id: str) -> None:
    """Best effort after an interruption: record what was placed, drop our staging folder."""
    try:
        _record(remote, report, remote.list_tree()[0], run_id)
        remote.delete(staging, recursive=True)
    except OSError:
        pass  # HDFS gone: the next load removes the (marked) staging folder and reads the files' marks
