#!/usr/bin/env python3
"""Push a local chest_xray tree into HDFS (`make hdfs-load`): resumable, verified, junk skipped.

    scripts/hdfs_load.py [SRC] [DEST] [--via auto|webhdfs|cli] [--workers N] [--dry-run]
                         [--verify size|crc|checksum] [--replace] [--break-lock]

Exit codes: 0 loaded and verified; 1 verification mismatch (including files kept because
hdfs-load did not write them); 2 usage, source, permission or other HDFS error; 3 HDFS
unreachable; 4 another load holds DEST's lock; 130 interrupted (re-run to resume).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

try:  # the one bootstrap of every entry script: the installed package (make venv; the wheel on a cluster) ...
    import cxr_pipeline  # noqa: F401
except ImportError:  # ... else the checkout's lib/
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))

from cxr_pipeline import config as conf  # noqa: E402
from cxr_pipeline import paths  # noqa: E402
from cxr_pipeline.cli import add_config_options, resolve_config  # noqa: E402
from cxr_pipeline.infra import hdfs_load, storage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/hdfs_load.py",
        description=__doc__.split("\n\n")[0],
        epilog="Exit codes: 0 ok, 1 verification mismatch (or files kept that hdfs-load did not write), "
        "2 usage/source/permission/HDFS error, 3 HDFS unreachable, 4 DEST locked by another load, "
        "130 interrupted (a re-run resumes). Defaults come from the config's hdfs_load section "
        "(conf/defaults.yaml).",
    )
    parser.add_argument(
        "src",
        nargs="?",
        help="local chest_xray folder (default: hdfs_load.source, " f"else the sample tree {paths.SAMPLE_TREE})",
    )
    parser.add_argument("dest", nargs="?", help="target hdfs:// URI (default: hdfs_load.target, else data.uri)")
    parser.add_argument(
        "--via",
        choices=hdfs_load.TRANSPORTS,
        help="how the bytes travel: cli = `hdfs dfs -put` "
        "batches, webhdfs = HdfsCLI thread pool, auto = cli when an hdfs command is available "
        f"and >= {hdfs_load.AUTO_CLI_MIN_FILES} files are to upload, else webhdfs",
    )
    parser.add_argument("--workers", type=int, help="parallel uploads (webhdfs threads / cli JVM batches)")
    parser.add_argument("--dry-run", action="store_true", help="scan and plan only; upload nothing")
    parser.add_argument(
        "--verify",
        choices=hdfs_load.VERIFY_MODES,
        help="size: compare sizes only; crc: also compare content by HDFS's file checksum (an MD5 of the "
        "CRC32Cs HDFS stores per block) with the same computed from the local file, without re-reading "
        "anything; checksum: re-read every file from HDFS and compare MD5s (plan and verification); "
        "default: hdfs_load.verify",
    )
    parser.add_argument(
        "--replace",
        action="store_true",
        help="overwrite files at DEST that hdfs-load did not " "write (by default they are kept and listed)",
    )
    parser.add_argument(
        "--break-lock",
        action="store_true",
        help="remove DEST's lock left by a load that was killed (its holder is named when a load is "
        "refused); refused while that load runs: on this host while its process lives, on another "
        "host until its lease has gone unrenewed for hdfs_load.lock_lease_s",
    )
    parser.add_argument("--webhdfs-url", help="WebHDFS URL of the target's NameNode (default: from config)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_options(parser, spark=False, verbose=False)
    return parser


def exit_code(error: BaseException) -> int | None:
    """The exit code of a load that stopped on ``error``; None for a bug (let it show its traceback)."""
    if isinstance(error, hdfs_load.TargetLocked):
        return 4
    if isinstance(error, storage.StorageUnavailable):
        return 3
    if isinstance(error, (hdfs_load.SourceError, OSError)):  # storage errors are OSErrors
        return 2
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = resolve_config(args)
        storage.configure(config)
        settings = hdfs_load.HdfsLoadSettings.from_config(config)
        target = args.dest or settings.target or conf.require(config, "data.uri")
    except (conf.ConfigError, hdfs_load.SourceError) as exc:
        print(f"hdfs-load: config error: {exc}", file=sys.stderr)
        return 2
    source = args.src or settings.source or str(paths.SAMPLE_TREE)
    workers = args.workers or settings.workers
    if workers < 1:
        print("hdfs-load: --workers must be at least 1", file=sys.stderr)
        return 2
    # A `kill` (SIGTERM) stops as cleanly as Ctrl-C: staging removed, placed files recorded.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        report = hdfs_load.load_tree(
            source,
            target,
            via=args.via or settings.via,
            workers=workers,
            webhdfs_url=args.webhdfs_url,
            user=storage.hdfs_settings().user,
            default_namenode=storage.hdfs_settings().namenode_uri,
            dry_run=args.dry_run,
            progress=not args.no_progress and sys.stderr.isatty(),
            replace=args.replace,
            verify_mode=args.verify or settings.verify,
            break_lock=args.break_lock,
            lock_lease_s=settings.lock_lease_s,
        )
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise
        print(f"hdfs-load: ERROR: {exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(
            "hdfs-load: interrupted; files already in place are complete, nothing partial is visible. "
            "Run the same command again to finish.",
            file=sys.stderr,
        )
        return 130
    print(hdfs_load.format_summary(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
