"""Plan: what to upload, given the scan, the remote listing, the manifest and the files' own marks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .scan import LocalFile


@dataclass
class Plan:
    to_upload: list[tuple[LocalFile, str]]  # (file, why: missing | size differs | checksum/content differs)
    unchanged: list[LocalFile]
    size_only: list[str]  # unchanged files whose remote copy has no recorded checksum
    extra_remote: list[str]  # files under the target that the source does not have
    replacing: set[str] = field(default_factory=set)  # rel paths that exist remotely and will be replaced
    kept_foreign: list[tuple[LocalFile, str]] = field(default_factory=list)  # differ, not ours, no --replace
    adopted: dict[str, dict[str, object]] = field(default_factory=dict)  # ours by their mark, not in the manifest
    same_content: set[str] = field(default_factory=set)  # unchanged files whose content was compared and equal

    @property
    def upload_bytes(self) -> int:
        return sum(f.size for f, _ in self.to_upload)


def _difference(
    f: LocalFile, remote_size: int, record: Mapping[str, object] | None, content_equal: bool | None
) -> str | None:
    """Why the remote copy of ``f`` is not the local file, or None when it is (as far as can be told)."""
    if remote_size != f.size:
        return "size differs"
    if content_equal is not None:
        return None if content_equal else "content differs"
    if record is not None and record.get("md5") != f.md5:
        return "checksum differs"
    return None


def own_record(
    recorded: Mapping[str, object] | None, mark: Mapping[str, object] | None, remote_size: int
) -> Mapping[str, object] | None:
    """What this tool wrote at a path, when the file there is still that: the manifest's record, else the file's
    own mark, whichever gives its current size; None when neither does (not this tool's file)."""
    for record in (recorded, mark):
        if record is not None and record.get("size") == remote_size:
            return record
    return None


def make_plan(
    files: Iterable[LocalFile],
    remote_sizes: Mapping[str, int],
    manifest: Mapping[str, Mapping[str, object]],
    replace: bool = False,
    content_equal: Mapping[str, bool] | None = None,
    marks: Mapping[str, Mapping[str, object] | None] | None = None,
) -> Plan:
    """What to upload, given the local files, the remote ``{rel: size}`` and the recorded ``{rel: {size, md5}}``.

    A remote file is this tool's when the manifest records it with its current size, or its mark (``marks``:
    ``{rel: record}`` read from the files the manifest does not record so) does; any other file that differs
    from the source is kept (``kept_foreign``) unless ``replace``. ``content_equal`` (``{rel: bool}``, by HDFS
    checksums or a re-read) makes the comparison by content."""
    content_equal = content_equal or {}
    marks = marks or {}
    plan = Plan([], [], [], [])
    local_rels = set()
    for f in files:
        local_rels.add(f.rel)
        remote_size = remote_sizes.get(f.rel)
        if remote_size is None:
            plan.to_upload.append((f, "missing"))
            continue
        recorded = manifest.get(f.rel)
        record = own_record(recorded, marks.get(f.rel), remote_size)
        if record is not None and record is not recorded:
            plan.adopted[f.rel] = {"size": record["size"], "md5": record.get("md5")}
        why = _difference(f, remote_size, record, content_equal.get(f.rel))
        if why is None:
            plan.unchanged.append(f)
            if content_equal.get(f.rel):
                plan.same_content.add(f.rel)
            if record is None and f.rel not in content_equal:
                plan.size_only.append(f.rel)
        elif record is not None or replace:
            plan.to_upload.append((f, why))
            plan.replacing.add(f.rel)
        else:
            plan.kept_foreign.append((f, why))
    plan.extra_remote = sorted(rel for rel in remote_sizes if rel not in local_rels)
    return plan


def merge_manifest(
    previous: Mapping[str, Mapping[str, object]],
    remote_sizes: Mapping[str, int],
    placed: Iterable[LocalFile],
    adopted: Mapping[str, Mapping[str, object]] | None = None,
) -> dict[str, dict[str, object]]:
    """Records still true (same remote size), whoever wrote them, plus the files found to be this tool's by
    their mark and the files this load placed (size and MD5 as sent)."""
    merged = {rel: dict(rec) for rel, rec in previous.items() if remote_sizes.get(rel) == rec.get("size")}
    for rel, rec in (adopted or {}).items():
        if remote_sizes.get(rel) == rec.get("size"):
            merged[rel] = dict(rec)
    for f in placed:
        if remote_sizes.get(f.rel) == f.size:
            merged[f.rel] = {"size": f.size, "md5": f.md5}
    return dict(sorted(merged.items()))
