"""Push a local ``chest_xray`` tree into HDFS: scan, plan, transfer (staged, renamed into place), verify.

HDFS itself (the WebHDFS client, its errors, the "is this the NameNode" check) is
``storage.HdfsFilesystem``; this package only decides what to move and checks the result.
Errors: ``SourceError`` (source, target or options unusable), ``TargetLocked`` (another
load holds the target), and storage's ``StorageUnavailable`` / ``StorageError``.

scan
    ``scan_local_tree`` walks the source with ``dataset_layout`` (``split/CLASS/file``
    layout, image extension, magic bytes) and takes an MD5 of every image;
    junk is skipped and reported, never uploaded.
plan
    The remote listing gives sizes, and ``<target>/.hdfs_load_manifest.json`` gives the
    size and MD5 of the bytes each earlier load sent. A file is uploaded when it is
    missing, its size differs, its content differs (``verify_mode`` ``crc``, the default:
    HDFS's own file checksum against the same computed from the local file; ``checksum``:
    a re-read), or its recorded MD5 differs from the local one. A file at the final path
    is this tool's when the manifest records it with its current size, or, failing that,
    when its own mark (an extended attribute set before it was renamed into place) does:
    so the files of a load killed before it wrote the manifest stay its own. Any other
    file that differs is never replaced unless ``replace``; it is listed instead.
    (``verify_mode="size"`` compares sizes only and says so: a same-size rewrite passes.)
transfer
    One load per target at a time: ``<target>/.hdfs_load.lock`` is created without
    overwrite and names the loader (host, pid and its start time, user, start); a second
    load is refused with that name. The holder renews a lease on it (its modification
    time, set to the NameNode's clock every ``lock_lease_s``/4); ``break_lock`` removes
    the lock only when its holder is gone: on this host its process has ended, on another
    host the lease has not been renewed for ``lock_lease_s``. A load whose lock was taken
    from it stops before placing another file.
    Every file goes to ``<target>/.staging-<runid>/<split>/<CLASS>/<file>`` first and is
    then renamed to its final name; an HDFS rename is atomic, so an interrupted load
    (Ctrl-C, killed, NameNode gone) never leaves a partial file under the final name.
    Each staging folder carries a marker naming its loader; a later load removes only
    folders with that marker whose loader is gone (not a user's ``.staging-x`` folder).
    Each staged file gets its mark (``user.cxr_pipeline.hdfs_load``: size, MD5, run)
    before the rename, so there is no instant at which a placed file is not recorded.
    The manifest is rewritten by merging: it is read again just before each write and
    keeps every record that still matches the file's size. It records the MD5 of the
    bytes actually sent (hashed while streaming over WebHDFS; for ``hdfs dfs -put``, the
    scan's MD5 if the file was untouched since, else a re-read of the staged copy), so a
    source rewritten during the upload cannot leave HDFS and the manifest disagreeing.
    Transports for the bytes: ``cli`` runs ``hdfs dfs -put`` on a few batches of
    files in parallel (one JVM per batch instead of one per file); ``webhdfs``
    uses a thread pool (one WebHDFS client per thread); ``auto`` takes ``cli`` for big
    uploads when an ``hdfs`` command exists, else ``webhdfs``. Listing, renames, the lock
    and the manifest go through WebHDFS in both cases.
verify
    The target is listed again and every source image must be there with its current
    size and, by ``verify_mode``, content (``crc``: HDFS's file checksum, which a DataNode
    computes from the CRCs stored with each block, against the same computed locally;
    ``checksum``: an MD5 of the file re-read from HDFS), each file's content compared once
    per run (the plan's comparison stands for the files it found equal); ``LoadReport.ok`` is False
    on any mismatch, including files that were kept because this tool did not write them.

Modules: ``scan``, ``plan``, ``transfer``, ``verify`` (the four steps), ``checksum`` (HDFS's file
checksum computed locally), ``lock`` (who is loading), ``remote`` (the target folder on HDFS),
``load`` (``load_tree``: the steps in order), ``summary`` (the printed report), ``shared``.
"""

from __future__ import annotations

from .checksum import HdfsChecksum, LocalChecksums
from .load import LoadReport, load_tree, read_marks
from .lock import (
    ACTIVE_RUNS,
    LockLease,
    Owner,
    break_refused_message,
    holder_alive,
    locked_message,
    new_run_id,
    process_start,
)
from .plan import Plan, make_plan, merge_manifest, own_record
from .remote import HdfsAddress, RemoteTree, resolve_target
from .scan import LocalFile, LocalScan, Skipped, classify_relative_path, file_stamp, md5_of, scan_local_tree
from .shared import (
    AUTO_CLI_MIN_FILES,
    CLOCK_PROBE_PREFIX,
    HEAD_BYTES,
    LOCK_NAME,
    MANIFEST_NAME,
    MARK_XATTR,
    MIN_FILES_PER_CLI_BATCH,
    OWN_PREFIX,
    READ_CHUNK,
    STAGING_MARKER,
    STAGING_PREFIX,
    TRANSPORTS,
    VERIFY_MODES,
    WRITTEN_BY,
    HdfsLoadSettings,
    SourceError,
    TargetLocked,
    check_lease,
    parallel_map,
)
from .summary import format_summary
from .transfer import PlaceFn, ProgressFn, choose_transport, cli_batches, sent_by_cli, upload_cli, upload_webhdfs
from .verify import Mismatch, compare_content, content_problem, verify

__all__ = [
    "ACTIVE_RUNS",
    "AUTO_CLI_MIN_FILES",
    "CLOCK_PROBE_PREFIX",
    "HEAD_BYTES",
    "HdfsAddress",
    "HdfsChecksum",
    "HdfsLoadSettings",
    "LOCK_NAME",
    "LoadReport",
    "LocalChecksums",
    "LocalFile",
    "LocalScan",
    "LockLease",
    "MANIFEST_NAME",
    "MARK_XATTR",
    "MIN_FILES_PER_CLI_BATCH",
    "Mismatch",
    "OWN_PREFIX",
    "Owner",
    "PlaceFn",
    "Plan",
    "ProgressFn",
    "READ_CHUNK",
    "RemoteTree",
    "STAGING_MARKER",
    "STAGING_PREFIX",
    "Skipped",
    "SourceError",
    "TRANSPORTS",
    "TargetLocked",
    "VERIFY_MODES",
    "WRITTEN_BY",
    "break_refused_message",
    "check_lease",
    "choose_transport",
    "classify_relative_path",
    "cli_batches",
    "compare_content",
    "content_problem",
    "file_stamp",
    "format_summary",
    "holder_alive",
    "load_tree",
    "locked_message",
    "make_plan",
    "md5_of",
    "merge_manifest",
    "new_run_id",
    "own_record",
    "parallel_map",
    "process_start",
    "read_marks",
    "resolve_target",
    "scan_local_tree",
    "sent_by_cli",
    "upload_cli",
    "upload_webhdfs",
    "verify",
]
