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
import signal
import sys

from cxr_pipeline import config as conf
from cxr_pipeline import paths
from cxr_pipeline.cli import Command, Job, UsageError, add_config_options, run
from cxr_pipeline.cli.runner import exit_status
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


EXIT_CODES = {  # most specific first; any other known error exits 2
    hdfs_load.TargetLocked: 4,
    storage.StorageUnavailable: 3,
    hdfs_load.SourceError: 2,
    OSError: 2,  # storage errors are OSErrors
}


def exit_code(error: BaseException) -> int | None:
    """The exit code of a load that stopped on ``error``; None for a bug (let it show its traceback)."""
    return exit_status(COMMAND, error)


def load(job: Job) -> int:
    args, config = job.args, job.config
    settings = hdfs_load.HdfsLoadSettings.from_config(config)
    target = args.dest or settings.target or conf.require(config, "data.uri")
    source = args.src or settings.source or str(paths.SAMPLE_TREE)
    workers = args.workers or settings.workers
    if workers < 1:
        raise UsageError("--workers must be at least 1")
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
    except KeyboardInterrupt:
        print(
            "hdfs-load: interrupted; files already in place are complete, nothing partial is visible. "
            "Run the same command again to finish.",
            file=sys.stderr,
        )
        return 130
    print(hdfs_load.format_summary(report))
    return 0 if report.ok else 1


COMMAND = Command(
    "hdfs-load", build_parser, load, errors=lambda: (hdfs_load.SourceError,), exit_codes=lambda: EXIT_CODES
)


def main(argv: list[str] | None = None) -> int:
    return run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
