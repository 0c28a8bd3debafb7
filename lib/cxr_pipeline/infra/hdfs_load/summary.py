"""The text report of a load (what ``make hdfs-load`` prints)."""

from __future__ import annotations

from collections import Counter, defaultdict

from ...images.layout import SPLITS
from .load import LoadReport


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def format_summary(report: LoadReport, max_listed: int = 30) -> str:
    lines = [f"{'DRY RUN: ' if report.dry_run else ''}{report.source} -> {report.target} (via {report.transport})"]
    per_group: dict[tuple[str, str], Counter] = defaultdict(Counter)
    placed = {f.rel for f in report.placed}
    planned = {f.rel for f, _ in report.plan.to_upload}
    for f in report.scan.files:
        c = per_group[f.group]
        c["files"] += 1
        c["bytes"] += f.size
        if f.rel in placed or (report.dry_run and f.rel in planned):
            c["up"] += 1
            c["up_bytes"] += f.size
    up_label = "to upload" if report.dry_run else "uploaded"
    lines.append(f"  {'split':<6} {'class':<12} {'files':>7} {'bytes':>12} {up_label:>10} {'up bytes':>12}")
    totals: Counter = Counter()
    for (split, label), c in sorted(
        per_group.items(), key=lambda kv: (SPLITS.index(kv[0][0]) if kv[0][0] in SPLITS else 99, kv[0][1])
    ):
        lines.append(f"  {split:<6} {label:<12} {c['files']:>7} {c['bytes']:>12,} {c['up']:>10} {c['up_bytes']:>12,}")
        totals.update(c)
    lines.append(
        f"  {'total':<19} {totals['files']:>7} {totals['bytes']:>12,} {totals['up']:>10} " f"{totals['up_bytes']:>12,}"
    )
    reasons = Counter(why for _, why in report.plan.to_upload)
    if reasons:
        lines.append("  planned uploads: " + ", ".join(f"{n} {why}" for why, n in sorted(reasons.items())))
    lines.append(
        f"  already on HDFS: {len(report.plan.unchanged)} file(s)"
        + (
            f" ({len(report.plan.size_only)} matched by size only: no checksum recorded)"
            if report.plan.size_only
            else ""
        )
    )
    if report.plan.extra_remote:
        lines.append(f"  on HDFS but not in the source (left alone): {len(report.plan.extra_remote)} file(s)")
    if report.not_replaced:
        lines.append(
            f"  NOT REPLACED: {len(report.not_replaced)} file(s) on HDFS that hdfs-load did not write differ "
            "from the source; kept (--replace overwrites them):"
        )
        lines.extend(f"    {rel}: {why}" for rel, why in report.not_replaced[:max_listed])
        if len(report.not_replaced) > max_listed:
            lines.append(f"    ... and {len(report.not_replaced) - max_listed} more")
    if report.changed_during_upload:
        lines.append(
            f"  changed while uploading: {len(report.changed_during_upload)} file(s) "
            f"({', '.join(report.changed_during_upload[:5])}); the manifest records the bytes sent"
        )
    if report.broken_lock:
        lines.append(f"  broke the lock of {report.broken_lock.describe()} (--break-lock)")
    if report.lock_holder:
        lines.append(f"  note: the target is locked by {report.lock_holder.describe()}: a load now would be refused")
    if report.stale_staging_removed:
        lines.append(f"  removed staging left by interrupted loads: {', '.join(report.stale_staging_removed)}")
    if report.staging_left_alone:
        lines.append(f"  left alone (not this tool's, or its load still runs): {', '.join(report.staging_left_alone)}")
    if report.scan.skipped:
        lines.append(f"  skipped {len(report.scan.skipped)} file(s) (not uploaded):")
        for s in report.scan.skipped[:max_listed]:
            lines.append(f"    {s.rel}: {s.reason}")
        if len(report.scan.skipped) > max_listed:
            lines.append(f"    ... and {len(report.scan.skipped) - max_listed} more")
    if not report.dry_run:
        secs = report.upload_seconds
        rate = (
            f"{report.uploaded_bytes / 1e6 / secs:.2f} MB/s, {len(report.placed) / secs:.1f} files/s"
            if secs > 0 and report.placed
            else "nothing uploaded"
        )
        lines.append(
            f"  uploaded {len(report.placed)} file(s), {_mb(report.uploaded_bytes)} in {secs:.2f} s "
            f"({rate}); total {report.total_seconds:.2f} s"
        )
    if report.mismatches:
        lines.append(f"  VERIFY FAILED: {len(report.mismatches)} mismatch(es) between the source and HDFS:")
        for m in report.mismatches[:max_listed]:
            lines.append(f"    {m.rel}: {m.problem}")
    elif report.mismatches is not None:
        what = {
            "size": "sizes (only sizes were compared: a same-size rewrite passes; --verify crc compares content)",
            "crc": "sizes and HDFS checksums (MD5 of the block CRCs, computed locally too)",
            "checksum": "sizes and content (MD5, re-read)",
        }[report.verify_mode]
        lines.append(f"  verified: {len(report.scan.files)} file(s) on HDFS with matching {what}")
    return "\n".join(lines)
