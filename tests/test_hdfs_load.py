"""make hdfs-load: planning (pure), and loads against the real local HDFS.

Interruptions are real: the loader process gets SIGINT/SIGKILL midway, and a
throwaway second HDFS instance (own ports and state dir) has its NameNode
stopped midway. The default instance is never stopped here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from cxr_pipeline.infra import hdfs_load, storage
from cxr_pipeline.infra.hdfs_load import LocalFile, make_plan, merge_manifest
from cxr_pipeline.infra.localstack.processes import free_port

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "hdfs_load.py"


# -- helpers ------------------------------------------------------------------


def tiny_jpeg(seed: int, size: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size), color=(seed * 37) % 256).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_tree(root: Path, n: int) -> Path:
    """``n`` tiny JPEGs spread over train/val/test x NORMAL/PNEUMONIA."""
    for i in range(n):
        split = ("train", "val", "test")[i % 3]
        label = ("NORMAL", "PNEUMONIA")[(i // 3) % 2]
        path = root / split / label / f"img{i:03d}.jpeg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tiny_jpeg(i, size=24 + i % 7))
    return root


def add_junk(root: Path) -> dict[str, str]:
    """Junk files and the reason the loader must give for each."""
    (root / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train" / "NORMAL" / "empty.jpeg").write_bytes(b"")
    (root / "val" / "PNEUMONIA" / "notes.txt").write_text("not an image")
    (root / "test" / "NORMAL" / "fake.jpeg").write_text("<html>not a jpeg</html>")
    (root / "README.md").write_text("readme")
    (root / "extra" / "NORMAL").mkdir(parents=True)
    (root / "extra" / "NORMAL" / "x.jpeg").write_bytes(tiny_jpeg(1))
    return {
        "train/NORMAL/.DS_Store": "hidden file",
        "train/NORMAL/empty.jpeg": "zero-byte file",
        "val/PNEUMONIA/notes.txt": "not an image extension",
        "test/NORMAL/fake.jpeg": "not an image (bad magic bytes)",
        "README.md": "not in the split/CLASS/file layout",
        "extra/NORMAL/x.jpeg": "unknown split folder 'extra'",
    }


def local_images(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*.jpeg")
        if p.stat().st_size and p.name != "fake.jpeg" and p.relative_to(root).parts[0] in ("train", "val", "test")
    }


def visible_files(target: str) -> dict[str, int]:
    """What a reader of the target sees: files outside hidden names (staging, manifest)."""
    if not storage.exists(target):
        return {}
    found = {}
    for info in storage.list_files(target, recursive=True):
        rel = info.uri[len(target.rstrip("/")) + 1 :]
        if not any(part.startswith(".") for part in rel.split("/")):
            found[rel] = info.size
    return found


def assert_byte_identical(root: Path, target: str) -> None:
    expected = local_images(root)
    assert set(visible_files(target)) == set(expected)
    for rel, data in expected.items():
        assert storage.read_bytes(f"{target}/{rel}") == data, rel


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--no-progress"], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def local_file(rel: str, data: bytes) -> LocalFile:
    return LocalFile(rel, Path("/nowhere") / rel, len(data), hashlib.md5(data).hexdigest())


# -- pure: layout, junk, plan --------------------------------------------------


@pytest.mark.parametrize(
    "rel, reason",
    [
        ("train/NORMAL/a.jpeg", None),
        ("val/PNEUMONIA/b.png", None),
        ("train/NORMAL/.DS_Store", "hidden file"),
        ("train/.DS_Store", "hidden file"),
        ("a.jpeg", "not in the split/CLASS/file layout (0 folder levels)"),
        ("train/NORMAL/sub/a.jpeg", "not in the split/CLASS/file layout (3 folder levels)"),
        ("training/NORMAL/a.jpeg", "unknown split folder 'training' (want one of train, val, test)"),
        ("train/.hidden/a.jpeg", "inside hidden folder '.hidden'"),
    ],
)
def test_classify_relative_path(rel, reason):
    assert hdfs_load.classify_relative_path(rel) == reason


def test_scan_skips_and_reports_junk_and_hashes_images(tmp_path):
    root = make_tree(tmp_path / "chest_xray", 6)
    expected_junk = add_junk(root)
    scan = hdfs_load.scan_local_tree(root)
    assert {f.rel for f in scan.files} == set(local_images(root))
    reasons = {s.rel: s.reason for s in scan.skipped}
    assert set(reasons) == set(expected_junk)
    for rel, reason in expected_junk.items():
        assert reasons[rel].startswith(reason), (rel, reasons[rel])
    one = scan.files[0]
    assert one.md5 == hashlib.md5(one.path.read_bytes()).hexdigest()
    assert one.size == one.path.stat().st_size


def test_scan_errors_are_clear(tmp_path):
    with pytest.raises(hdfs_load.SourceError, match="does not exist"):
        hdfs_load.scan_local_tree(tmp_path / "missing")
    (tmp_path / "file.jpeg").write_bytes(tiny_jpeg(0))
    with pytest.raises(hdfs_load.SourceError, match="is a file"):
        hdfs_load.scan_local_tree(tmp_path / "file.jpeg")
    (tmp_path / "empty" / "train" / "NORMAL").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "NORMAL" / ".DS_Store").write_text("x")
    with pytest.raises(hdfs_load.SourceError, match="no images .* 1 file\\(s\\) skipped"):
        hdfs_load.scan_local_tree(tmp_path / "empty")


def test_plan_uploads_missing_resized_and_changed_files_only():
    same, resized, changed, unrecorded, new = (
        local_file(f"train/NORMAL/{n}.jpeg", tiny_jpeg(i))
        for i, n in enumerate(["same", "resized", "changed", "unrec", "new"])
    )
    remote = {
        same.rel: same.size,
        resized.rel: resized.size + 1,
        changed.rel: changed.size,
        unrecorded.rel: unrecorded.size,
        "train/NORMAL/only_remote.jpeg": 10,
    }
    manifest = {
        same.rel: {"size": same.size, "md5": same.md5},
        resized.rel: {"size": resized.size + 1, "md5": "1" * 32},
        changed.rel: {"size": changed.size, "md5": "0" * 32},
    }
    plan = make_plan([same, resized, changed, unrecorded, new], remote, manifest)
    assert {f.rel: why for f, why in plan.to_upload} == {
        resized.rel: "size differs",
        changed.rel: "checksum differs",
        new.rel: "missing",
    }
    assert {f.rel for f in plan.unchanged} == {same.rel, unrecorded.rel}
    assert plan.size_only == [unrecorded.rel]
    assert plan.extra_remote == ["train/NORMAL/only_remote.jpeg"]
    assert plan.replacing == {resized.rel, changed.rel}
    assert plan.kept_foreign == []


def test_plan_keeps_files_it_did_not_write_unless_replace():
    unrecorded, rewritten, same_size = (
        local_file(f"train/NORMAL/{n}.jpeg", tiny_jpeg(i))
        for i, n in enumerate(["unrecorded", "rewritten", "same_size"])
    )
    remote = {unrecorded.rel: unrecorded.size + 5, rewritten.rel: rewritten.size + 1, same_size.rel: same_size.size}
    manifest = {rewritten.rel: {"size": rewritten.size, "md5": rewritten.md5}}  # someone else changed it since
    plan = make_plan([unrecorded, rewritten, same_size], remote, manifest)
    assert plan.to_upload == [] and plan.replacing == set()
    assert {f.rel: why for f, why in plan.kept_foreign} == {
        unrecorded.rel: "size differs",
        rewritten.rel: "size differs",
    }
    assert plan.size_only == [same_size.rel]
    by_content = make_plan([same_size], remote, {}, content_equal={same_size.rel: False})
    assert [(f.rel, why) for f, why in by_content.kept_foreign] == [(same_size.rel, "content differs")]
    forced = make_plan([unrecorded, rewritten, same_size], remote, manifest, replace=True)
    assert {f.rel for f, _ in forced.to_upload} == forced.replacing == {unrecorded.rel, rewritten.rel}


def test_plan_takes_a_file_whose_mark_gives_its_size_as_its_own():
    kept, resized, foreign = (
        local_file(f"train/NORMAL/{n}.jpeg", tiny_jpeg(i)) for i, n in enumerate(["kept", "resized", "foreign"])
    )
    remote = {kept.rel: kept.size, resized.rel: resized.size + 3, foreign.rel: foreign.size + 1}
    marks = {
        kept.rel: {"size": kept.size, "md5": kept.md5},
        resized.rel: {"size": resized.size + 3, "md5": "1" * 32},  # its load was killed before the manifest
        foreign.rel: {"size": foreign.size, "md5": foreign.md5},  # appended to since: no longer what it sent
    }
    plan = make_plan([kept, resized, foreign], remote, {}, marks=marks)
    assert [f.rel for f in plan.unchanged] == [kept.rel] and plan.size_only == []
    assert [(f.rel, why) for f, why in plan.to_upload] == [(resized.rel, "size differs")]
    assert [(f.rel, why) for f, why in plan.kept_foreign] == [(foreign.rel, "size differs")]
    assert plan.adopted == {kept.rel: {"size": kept.size, "md5": kept.md5}, resized.rel: marks[resized.rel]}


def test_merge_manifest_keeps_true_records_and_adds_placed():
    a, b = local_file("train/NORMAL/a.jpeg", b"aaaa"), local_file("train/NORMAL/b.jpeg", b"bb")
    previous = {
        a.rel: {"size": 4, "md5": a.md5},
        "gone.jpeg": {"size": 3, "md5": "x"},
        "resized.jpeg": {"size": 3, "md5": "y"},
    }
    merged = merge_manifest(previous, {a.rel: 4, "resized.jpeg": 5, b.rel: 2}, [b])
    assert merged == {a.rel: {"size": 4, "md5": a.md5}, b.rel: {"size": 2, "md5": b.md5}}


def test_cli_batches_cover_every_file_once():
    files = [local_file(f"train/NORMAL/{i}.jpeg", b"x" * (i + 1)) for i in range(230)]
    batches = hdfs_load.cli_batches(files, workers=4)
    assert [f for batch in batches for f in batch] == files
    assert len(batches) == 8 and all(len(b) <= 29 for b in batches)
    assert len(hdfs_load.cli_batches(files[:10], workers=8)) == 1  # too few files for a second JVM


def test_auto_transport_uses_webhdfs_for_small_uploads():
    assert hdfs_load.choose_transport("auto", 16) == "webhdfs"
    expected_big = "cli" if storage.find_hdfs_dfs_command() else "webhdfs"
    assert hdfs_load.choose_transport("auto", hdfs_load.AUTO_CLI_MIN_FILES) == expected_big
    assert hdfs_load.choose_transport("webhdfs", 5000) == "webhdfs"
    with pytest.raises(hdfs_load.SourceError, match="--via"):
        hdfs_load.choose_transport("ftp")


def test_cli_exit_codes_follow_storage_errors():
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("hdfs_load_script", SCRIPT)
    script = module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.exit_code(storage.StorageUnavailable("down")) == 3
    assert script.exit_code(storage.StoragePermissionError("denied")) == 2
    assert script.exit_code(storage.StorageError("quota")) == 2
    assert script.exit_code(hdfs_load.SourceError("bad")) == 2
    assert script.exit_code(hdfs_load.TargetLocked("busy")) == 4
    assert script.exit_code(KeyError("bug")) is None


def test_resolve_target():
    address = hdfs_load.resolve_target("hdfs://127.0.0.1:9000/data/chest_xray/", webhdfs_url="http://h:1/")
    assert (address.namenode_uri, address.webhdfs_url, address.path) == (
        "hdfs://127.0.0.1:9000",
        "http://h:1",
        "/data/chest_xray",
    )
    assert hdfs_load.resolve_target("/data/x", "hdfs://nn:8020", "http://nn:9870").uri("a") == "hdfs://nn:8020/data/x/a"
    with pytest.raises(hdfs_load.SourceError, match="HDFS root"):
        hdfs_load.resolve_target("hdfs://127.0.0.1:9000/")
    with pytest.raises(hdfs_load.SourceError, match="hdfs://"):
        hdfs_load.resolve_target("s3a://bucket/x")


def test_cli_help_and_missing_source(tmp_path):
    assert run_cli("--help").returncode == 0
    result = run_cli(str(tmp_path / "nope"), "hdfs://127.0.0.1:9000/tests/never")
    assert result.returncode == 2
    assert "source folder" in result.stderr and "does not exist" in result.stderr


def test_a_lease_of_no_time_is_refused(tmp_path):
    root = make_tree(tmp_path / "chest_xray", 1)
    result = run_cli(str(root), "hdfs://127.0.0.1:9000/tests/never", "--set", "hdfs_load.lock_lease_s=0")
    assert result.returncode == 2 and "hdfs_load.lock_lease_s must be a number of seconds above 0" in result.stderr


def test_unreachable_namenode_exit_3(tmp_path):
    root = make_tree(tmp_path / "chest_xray", 3)
    port = free_port()
    result = run_cli(
        str(root), f"hdfs://127.0.0.1:{port}/data/chest_xray", "--webhdfs-url", f"http://127.0.0.1:{free_port()}"
    )
    assert result.returncode == 3, result.stderr
    assert f"NameNode at hdfs://127.0.0.1:{port} does not answer" in result.stderr
    assert "make hdfs-up" in result.stderr


# -- against the real local HDFS ------------------------------------------------


@pytest.mark.hdfs
def test_an_upload_cut_midway_is_sent_again_and_hashed_once(hdfs_tmp, tmp_path, monkeypatch):
    """A DataNode that dies mid-upload: storage sends the file again to another one, and the MD5 hdfs-load
    records is that of the bytes that landed (the body's hash restarts with it), not of both attempts."""
    from test_storage import dropping_port, first_redirect_to, without_backoff

    without_backoff(monkeypatch)
    data = os.urandom(200_000)
    local = tmp_path / "x.jpeg"
    local.write_bytes(data)
    remote = hdfs_load.RemoteTree(hdfs_load.resolve_target(hdfs_tmp))
    with dropping_port(after_bytes=50_000) as port:
        redirects = first_redirect_to(remote.fs, port, monkeypatch)
        size, md5 = remote.upload(local, "staged/x.jpeg")
    assert len(redirects) == 2
    assert (size, md5) == (len(data), hashlib.md5(data).hexdigest())
    assert storage.read_bytes(f"{hdfs_tmp}/staged/x.jpeg") == data


@pytest.mark.hdfs
def test_load_sample_tree_then_second_load_uploads_nothing(sample_tree, hdfs_tmp):
    target = f"{hdfs_tmp}/chest_xray"
    first = hdfs_load.load_tree(sample_tree, target, via="webhdfs", workers=4, progress=False)
    assert first.ok and first.mismatches == []
    assert len(first.placed) == len(first.scan.files) == 16
    assert_byte_identical(sample_tree, target)
    assert storage.exists(f"{target}/{hdfs_load.MANIFEST_NAME}")
    assert not [n for n in storage.list_files(target) if "/.staging-" in n.uri]
    summary = hdfs_load.format_summary(first)
    assert "verified: 16 file(s)" in summary and "uploaded 16 file(s)" in summary

    second = hdfs_load.load_tree(sample_tree, target, via="cli", workers=4, progress=False)
    assert second.ok and second.placed == [] and second.plan.to_upload == []
    assert len(second.plan.unchanged) == 16 and second.plan.size_only == []


@pytest.mark.hdfs
def test_cli_transport_and_changed_files_are_reuploaded(tmp_path, hdfs_tmp):
    root = make_tree(tmp_path / "chest_xray", 12)
    target = f"{hdfs_tmp}/chest_xray"
    first = hdfs_load.load_tree(root, target, via="cli", workers=2, progress=False)
    assert first.ok and len(first.placed) == 12
    assert_byte_identical(root, target)

    same_size = root / "train" / "NORMAL" / "img000.jpeg"  # same size, other bytes: only the MD5 tells
    data = bytearray(same_size.read_bytes())
    data[-3] ^= 0xFF
    same_size.write_bytes(bytes(data))
    grown = root / "val" / "NORMAL" / "img001.jpeg"
    grown.write_bytes(tiny_jpeg(99, size=60))
    second = hdfs_load.load_tree(root, target, via="webhdfs", workers=2, progress=False, verify_mode="size")
    assert {f.rel: why for f, why in second.plan.to_upload} == {
        "train/NORMAL/img000.jpeg": "checksum differs",
        "val/NORMAL/img001.jpeg": "size differs",
    }
    assert second.ok and len(second.placed) == 2
    assert_byte_identical(root, target)


@pytest.mark.hdfs
def test_junk_is_skipped_and_reported_by_the_cli(tmp_path, hdfs_tmp):
    root = make_tree(tmp_path / "chest_xray", 6)
    junk = add_junk(root)
    target = f"{hdfs_tmp}/chest_xray"
    result = run_cli(str(root), target, "--via", "webhdfs")
    assert result.returncode == 0, result.stderr
    assert f"skipped {len(junk)} file(s)" in result.stdout
    for rel, reason in junk.items():
        assert f"{rel}: {reason}" in result.stdout
    assert "verified: 6 file(s)" in result.stdout
    assert set(visible_files(target)) == set(local_images(root))


@pytest.mark.hdfs
def test_dry_run_writes_nothing(tmp_path, hdfs_tmp):
    root = make_tree(tmp_path / "chest_xray", 4)
    result = run_cli(str(root), f"{hdfs_tmp}/chest_xray", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "DRY RUN" in result.stdout and "planned uploads: 4 missing" in result.stdout
    assert not storage.exists(f"{hdfs_tmp}/chest_xray")


@pytest.mark.hdfs
@pytest.mark.parametrize(
    "sig, via",
    [
        pytest.param(signal.SIGINT, "webhdfs", id="sigint-webhdfs"),
        pytest.param(signal.SIGKILL, "webhdfs", id="sigkill-webhdfs"),
        pytest.param(signal.SIGINT, "cli", id="sigint-cli", marks=pytest.mark.slow),
    ],
)
def test_interrupted_load_leaves_no_partial_file_and_resumes(tmp_path, hdfs_tmp, sig, via):
    n = 45 if via == "webhdfs" else 75  # cli: 3 JVM batches of 25, one at a time
    root = make_tree(tmp_path / "chest_xray", n)
    target = f"{hdfs_tmp}/chest_xray"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(root), target, "--via", via, "--workers", "1", "--no-progress"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while len(visible_files(target)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    expected = local_images(root)
    seen = visible_files(target)
    assert 0 < len(seen) < n, "the load was not interrupted midway"
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "Run the same command again" in stderr, stderr
    for rel, size in seen.items():  # whatever is visible is complete
        assert size == len(expected[rel]) and storage.read_bytes(f"{target}/{rel}") == expected[rel]

    if sig == signal.SIGKILL:  # no chance to clean up: its lock stays, naming the dead loader
        refused = run_cli(str(root), target, "--via", via)
        assert refused.returncode == 4, refused.stdout + refused.stderr
        assert f"pid {proc.pid} " in refused.stderr and "no longer running" in refused.stderr
        assert "--break-lock" in refused.stderr
    result = run_cli(
        str(root), target, "--via", via, "--workers", "2", *(["--break-lock"] if sig == signal.SIGKILL else [])
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"verified: {n} file(s)" in result.stdout
    if sig == signal.SIGKILL:  # the next load removes the (marked) staging folder of the dead one
        assert "removed staging left by interrupted loads: .staging-" in result.stdout
        assert "broke the lock of " in result.stdout
    assert_byte_identical(root, target)
    assert not [i for i in storage.list_files(target) if "/.staging-" in i.uri]


@pytest.mark.hdfs
@pytest.mark.slow
def test_namenode_stopped_midway_then_resume(tmp_path):
    """A throwaway HDFS on its own ports: its NameNode is killed during a load."""
    from cxr_pipeline.infra.localstack.hdfs_cluster import LocalHdfs

    hdfs = LocalHdfs(
        tmp_path / "hdfs",
        rpc_port=free_port(),
        http_port=free_port(),
        datanode_ports=(free_port(), free_port(), free_port()),
        heap="256m",
    )
    hdfs.up()
    try:
        root = make_tree(tmp_path / "chest_xray", 30)
        target = f"{hdfs.namenode_uri}/data/chest_xray"
        placed = []

        def stop_namenode_after_five(f: LocalFile) -> None:
            placed.append(f)
            if len(placed) == 5:
                hdfs.namenode.stop(timeout=10)

        with pytest.raises(storage.StorageUnavailable) as failure:
            hdfs_load.load_tree(
                root,
                target,
                via="webhdfs",
                workers=2,
                webhdfs_url=hdfs.webhdfs_url,
                progress=False,
                on_placed=stop_namenode_after_five,
            )
        assert "unreachable" in str(failure.value) or "does not answer" in str(failure.value)

        hdfs.up()
        expected = local_images(root)
        seen = visible_files(target)
        assert 5 <= len(seen) < 30
        for rel in seen:
            assert storage.read_bytes(f"{target}/{rel}") == expected[rel]
        with pytest.raises(hdfs_load.TargetLocked, match=f"pid {os.getpid()}"):  # its lock outlived HDFS
            hdfs_load.load_tree(root, target, via="webhdfs", webhdfs_url=hdfs.webhdfs_url, progress=False)
        report = hdfs_load.load_tree(
            root, target, via="webhdfs", workers=2, webhdfs_url=hdfs.webhdfs_url, progress=False, break_lock=True
        )
        assert report.ok and report.stale_staging_removed and report.broken_lock.pid == os.getpid()
        assert_byte_identical(root, target)
    finally:
        hdfs.down()


# -- touches only what it owns (issue 10 §5) -------------------------------------


def marked_staging(target: str, name: str, pid: int) -> str:
    """A staging folder with hdfs_load's marker, naming a loader on this host with ``pid``."""
    owner = {
        "run_id": name,
        "host": socket.gethostname(),
        "pid": pid,
        "user": "someone",
        "started_at": "2026-01-01T00:00:00Z",
        "written_by": "cxr_pipeline.hdfs_load",
    }
    storage.write_bytes(f"{target}/.staging-{name}/.hdfs_load_staging.json", json.dumps(owner).encode())
    storage.write_bytes(f"{target}/.staging-{name}/train/NORMAL/half.jpeg", b"partial")
    return f".staging-{name}"


@pytest.mark.hdfs
def test_second_load_is_refused_while_one_holds_the_lock(tmp_path, hdfs_tmp):
    root = make_tree(tmp_path / "chest_xray", 3)
    target = f"{hdfs_tmp}/chest_xray"
    second: list[subprocess.CompletedProcess] = []

    def start_a_second_load(f: LocalFile) -> None:
        if not second:
            second.append(run_cli(str(root), target, "--via", "webhdfs"))

    report = hdfs_load.load_tree(root, target, via="webhdfs", workers=1, progress=False, on_placed=start_a_second_load)
    assert report.ok and len(report.placed) == 3
    refused = second[0]
    assert refused.returncode == 4, refused.stdout + refused.stderr
    for who in (
        socket.gethostname(),
        f"pid {os.getpid()} ",
        "since 20",
        "still running",
        "--break-lock",
        hdfs_load.RemoteTree(hdfs_load.resolve_target(target)).user,
    ):
        assert who in refused.stderr, (who, refused.stderr)
    assert not storage.exists(f"{target}/{hdfs_load.LOCK_NAME}")  # released at the end


@pytest.mark.hdfs
def test_only_its_own_stale_staging_folders_are_removed(tmp_path, hdfs_tmp):
    root = make_tree(tmp_path / "chest_xray", 3)
    target = f"{hdfs_tmp}/chest_xray"
    users = f"{target}/.staging-foo/notes.txt"
    storage.write_bytes(users, b"a user's own folder")
    finished = subprocess.Popen(["true"])
    finished.wait()
    with subprocess.Popen(["sleep", "60"]) as alive:
        try:
            live = marked_staging(target, "live", alive.pid)
            dead = marked_staging(target, "dead", finished.pid)
            report = hdfs_load.load_tree(root, target, via="webhdfs", workers=2, progress=False)
        finally:
            alive.kill()
    assert report.ok
    assert report.stale_staging_removed == [dead] and not storage.exists(f"{target}/{dead}")
    assert sorted(report.staging_left_alone) == [".staging-foo", live]
    assert storage.read_bytes(users) == b"a user's own folder" and storage.exists(f"{target}/{live}")
    assert "left alone (not this tool's, or its load still runs): " in hdfs_load.format_summary(report)


@pytest.mark.hdfs
def test_a_file_it_did_not_write_is_kept_and_listed_unless_replace(tmp_path, hdfs_tmp):
    root = make_tree(tmp_path / "chest_xray", 3)
    target = f"{hdfs_tmp}/chest_xray"
    rel = "train/NORMAL/img000.jpeg"
    storage.write_bytes(f"{target}/{rel}", b"someone else's file")
    kept = hdfs_load.load_tree(root, target, via="webhdfs", progress=False)
    assert not kept.ok and kept.not_replaced == [(rel, "size differs")]
    assert storage.read_bytes(f"{target}/{rel}") == b"someone else's file"
    summary = hdfs_load.format_summary(kept)
    assert "NOT REPLACED: 1 file(s)" in summary and f"{rel}: size differs" in summary and "--replace" in summary

    replaced = hdfs_load.load_tree(root, target, via="webhdfs", progress=False, replace=True)
    assert replaced.ok and [f.rel for f in replaced.placed] == [rel] and replaced.not_replaced == []
    assert_byte_identical(root, target)


@pytest.mark.hdfs
def test_manifest_records_the_bytes_sent_when_the_source_changes_during_the_upload(tmp_path, hdfs_tmp):
    root = make_tree(tmp_path / "chest_xray", 4)
    target = f"{hdfs_tmp}/chest_xray"
    original: dict[str, bytes] = {}

    def rewrite_a_later_file(f: LocalFile) -> None:  # one worker: the others have not been sent yet
        if not original:
            rel = sorted(set(local_images(root)) - {f.rel})[0]
            original[rel] = (root / rel).read_bytes()
            changed = bytearray(original[rel])
            changed[-3] ^= 0xFF  # same size, other bytes
            (root / rel).write_bytes(bytes(changed))

    report = hdfs_load.load_tree(root, target, via="webhdfs", workers=1, progress=False, on_placed=rewrite_a_later_file)
    ((rel, data),) = original.items()
    manifest = json.loads(storage.read_bytes(f"{target}/{hdfs_load.MANIFEST_NAME}"))["files"]
    assert manifest[rel]["md5"] == hashlib.md5(storage.read_bytes(f"{target}/{rel}")).hexdigest()
    assert report.ok and report.changed_during_upload == [rel]

    (root / rel).write_bytes(data)  # back to what the scan saw: HDFS has the rewritten bytes
    again = hdfs_load.load_tree(root, target, via="webhdfs", progress=False, verify_mode="size")  # by the manifest
    assert [(f.rel, why) for f, why in again.plan.to_upload] == [(rel, "checksum differs")]
    assert_byte_identical(root, target)


@pytest.mark.hdfs
def test_hdfs_dfs_put_records_what_reached_hdfs_when_the_source_changed(tmp_path, hdfs_tmp):
    root = make_tree(tmp_path / "chest_xray", 1)
    scanned = hdfs_load.scan_local_tree(root).files[0]
    remote = hdfs_load.RemoteTree(hdfs_load.resolve_target(hdfs_tmp))
    remote.upload(scanned.path, "staged.jpeg")
    assert hdfs_load.sent_by_cli(remote, scanned, "staged.jpeg") is scanned  # untouched: the scan's MD5
    scanned.path.write_bytes(tiny_jpeg(50))  # rewritten after the copy: the staged bytes are re-read
    storage.write_bytes(f"{hdfs_tmp}/staged.jpeg", b"what the put copied")
    sent = hdfs_load.sent_by_cli(remote, scanned, "staged.jpeg")
    assert (sent.size, sent.md5) == (19, hashlib.md5(b"what the put copied").hexdigest())


@pytest.mark.hdfs
def test_verify_checksum_compares_content(tmp_path, hdfs_tmp):
    root = make_tree(tmp_path / "chest_xray", 3)
    target = f"{hdfs_tmp}/chest_xray"
    foreign, ours = "train/NORMAL/img000.jpeg", "val/NORMAL/img001.jpeg"
    same_size_other_bytes = bytes(b ^ 0xFF for b in (root / foreign).read_bytes())
    storage.write_bytes(f"{target}/{foreign}", same_size_other_bytes)  # not written by hdfs-load
    first = hdfs_load.load_tree(root, target, via="webhdfs", progress=False, verify_mode="size")
    assert first.ok and first.plan.size_only == [foreign]  # sizes alone cannot tell
    storage.write_bytes(f"{target}/{ours}", bytes(b ^ 0xFF for b in (root / ours).read_bytes()))

    result = run_cli(str(root), target, "--via", "webhdfs", "--verify", "checksum")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{foreign}: content differs" in result.stdout and "NOT REPLACED: 1 file(s)" in result.stdout
    assert "planned uploads: 1 content differs" in result.stdout  # its own file is put right
    assert storage.read_bytes(f"{target}/{ours}") == (root / ours).read_bytes()
    assert storage.read_bytes(f"{target}/{foreign}") == same_size_other_bytes
    assert "VERIFY FAILED: 1 mismatch" in result.stdout and "content differs: MD5" in result.stdout


# -- a live load is never broken; a killed load's files stay its own (issue 30 §3) -----------


def start_loader(root: Path, target: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(root), target, "--no-progress", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_placed(target: str, proc: subprocess.Popen, count: int) -> None:
    deadline = time.monotonic() + 240
    while len(visible_files(target)) < count and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the load ended before it could be interrupted: " + proc.communicate()[1]


def manifest_records(target: str) -> dict[str, dict]:
    return json.loads(storage.read_bytes(f"{target}/{hdfs_load.MANIFEST_NAME}"))["files"]


@pytest.mark.hdfs
def test_break_lock_is_refused_while_the_holder_runs(tmp_path, hdfs_tmp):
    n = 60
    root = make_tree(tmp_path / "chest_xray", n)
    target = f"{hdfs_tmp}/chest_xray"
    first = start_loader(root, target, "--via", "webhdfs", "--workers", "1")
    try:
        wait_for_placed(target, first, 3)
        second = run_cli(str(root), target, "--via", "webhdfs", "--break-lock")
        assert first.poll() is None, "the first load ended before the second one tried"
    finally:
        out, err = first.communicate(timeout=300)
    assert second.returncode == 4, second.stdout + second.stderr
    assert "--break-lock refused" in second.stderr and f"pid {first.pid} " in second.stderr, second.stderr
    assert "appeared on HDFS during the load" not in out + second.stdout
    assert first.returncode == 0, out + err
    assert f"verified: {n} file(s)" in out
    assert len(manifest_records(target)) == n
    again = run_cli(str(root), target, "--via", "webhdfs")
    assert again.returncode == 0 and f"already on HDFS: {n} file(s)\n" in again.stdout, again.stdout


@pytest.mark.hdfs
def test_a_killed_loads_files_stay_its_own(tmp_path, hdfs_tmp):
    n = 60
    root = make_tree(tmp_path / "chest_xray", n)
    target = f"{hdfs_tmp}/chest_xray"
    killed = start_loader(root, target, "--via", "webhdfs", "--workers", "1")
    wait_for_placed(target, killed, 20)
    killed.kill()
    killed.communicate(timeout=60)
    placed_before_the_kill = sorted(visible_files(target))
    assert 20 <= len(placed_before_the_kill) < n

    resumed = run_cli(str(root), target, "--via", "webhdfs", "--break-lock")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "matched by size only" not in resumed.stdout
    assert sorted(manifest_records(target)) == sorted(local_images(root))

    changed = root / placed_before_the_kill[0]
    changed.write_bytes(tiny_jpeg(200, size=70))  # another size: a plan by sizes alone sees it
    again = run_cli(str(root), target, "--via", "webhdfs")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "NOT REPLACED" not in again.stdout and "planned uploads: 1 size differs" in again.stdout
    assert_byte_identical(root, target)


@pytest.mark.hdfs
def test_manifest_writes_keep_another_writers_records(tmp_path, hdfs_tmp):
    root = make_tree(tmp_path / "chest_xray", 3)
    target = f"{hdfs_tmp}/chest_xray"
    theirs = "train/NORMAL/theirs.jpeg"

    def another_writer_records_a_file(f: LocalFile) -> None:  # lands between this load's plan and its record
        if not storage.exists(f"{target}/{theirs}"):
            storage.write_bytes(f"{target}/{theirs}", b"their bytes")
            remote = hdfs_load.RemoteTree(hdfs_load.resolve_target(target))
            record = {"size": 11, "md5": hashlib.md5(b"their bytes").hexdigest()}
            remote.write_manifest({theirs: record}, "another-run")

    report = hdfs_load.load_tree(
        root, target, via="webhdfs", workers=1, progress=False, on_placed=another_writer_records_a_file
    )
    assert report.ok
    assert sorted(manifest_records(target)) == sorted([*local_images(root), theirs])


# -- content verification by default (issue 30 §4) ----------------------------------------------


@pytest.mark.hdfs
def test_same_size_junk_over_a_loaded_file_is_found_by_default(tmp_path, hdfs_tmp):
    root = make_tree(tmp_path / "chest_xray", 3)
    target = f"{hdfs_tmp}/chest_xray"
    assert run_cli(str(root), target, "--via", "webhdfs").returncode == 0
    rel = "val/NORMAL/img001.jpeg"
    junk = bytes(b ^ 0xFF for b in (root / rel).read_bytes())
    storage.write_bytes(f"{target}/{rel}", junk)  # same size, other bytes

    by_size = run_cli(str(root), target, "--via", "webhdfs", "--verify", "size")
    assert by_size.returncode == 0, by_size.stdout + by_size.stderr
    assert "only sizes were compared" in by_size.stdout
    assert storage.read_bytes(f"{target}/{rel}") == junk

    default = run_cli(str(root), target, "--via", "webhdfs")
    assert default.returncode == 0, default.stdout + default.stderr
    assert "planned uploads: 1 content differs" in default.stdout
    assert "verified: 3 file(s) on HDFS with matching sizes and HDFS checksums" in default.stdout
    assert_byte_identical(root, target)


@pytest.mark.hdfs
@pytest.mark.parametrize(
    "size, block_size",
    [
        pytest.param(3000, None, id="one-block-partial-chunk"),
        pytest.param(2_500_000, 1 << 20, id="three-blocks"),
        pytest.param(5 * (1 << 20) + 17, 1 << 20, id="six-blocks"),
        pytest.param(4 * (1 << 20), 1 << 20, id="four-whole-blocks"),
    ],
)
def test_hdfs_checksum_computed_locally_is_the_namenodes(hdfs_tmp, tmp_path, size, block_size):
    data = os.urandom(size)
    local = tmp_path / "x.bin"
    local.write_bytes(data)
    fs = storage.hdfs_filesystem(hdfs_tmp)
    path = f"{hdfs_load.resolve_target(hdfs_tmp).path}/x.bin"
    fs.client.write(path, data=data, **({"blocksize": block_size} if block_size else {}))
    theirs = hdfs_load.HdfsChecksum.from_webhdfs(fs.file_checksum(path), path)
    assert theirs.of_local_file(local) == theirs.md5
    changed = bytearray(data)
    changed[size // 2] ^= 1
    local.write_bytes(bytes(changed))
    assert theirs.of_local_file(local) != theirs.md5


@pytest.mark.hdfs
def test_hdfs_checksum_asks_another_datanode_when_one_refuses(hdfs_tmp, monkeypatch):
    from test_storage import first_redirect_to, refusing_port, without_backoff

    without_backoff(monkeypatch)
    fs = storage.hdfs_filesystem(hdfs_tmp)
    path = f"{hdfs_load.resolve_target(hdfs_tmp).path}/x.bin"
    fs.create(path, b"x" * 5000)
    expected = fs.file_checksum(path)
    with refusing_port() as port:
        redirects = first_redirect_to(fs, port, monkeypatch)
        assert fs.file_checksum(path) == expected
    assert len(redirects) == 2, "the checksum went back to the NameNode once"


# -- the lock's lease -----------------------------------------------------------------------------


def write_lock(target: str, host: str, pid: int, proc_start: int | None = None) -> None:
    owner = hdfs_load.Owner("held-" + host, host, pid, "someone", "2026-01-01T00:00:00Z", proc_start)
    storage.write_bytes(f"{target}/{hdfs_load.LOCK_NAME}", owner.to_json())


@pytest.mark.hdfs
def test_break_lock_takes_another_hosts_lock_only_once_its_lease_expired(tmp_path, hdfs_tmp):
    root = make_tree(tmp_path / "chest_xray", 2)
    target = f"{hdfs_tmp}/chest_xray"
    write_lock(target, "another-host", 4242)
    with pytest.raises(hdfs_load.TargetLocked, match="--break-lock refused: .* lease was renewed 0 s ago"):
        hdfs_load.load_tree(root, target, via="webhdfs", progress=False, break_lock=True, lock_lease_s=60)
    assert storage.exists(f"{target}/{hdfs_load.LOCK_NAME}") and not visible_files(target)

    fs = storage.hdfs_filesystem(target)
    lock = f"{hdfs_load.resolve_target(target).path}/{hdfs_load.LOCK_NAME}"
    fs.set_modification_time(lock, fs.status(lock)["modificationTime"] - 61_000)  # not renewed for 61 s
    report = hdfs_load.load_tree(root, target, via="webhdfs", progress=False, break_lock=True, lock_lease_s=60)
    assert report.ok and report.broken_lock.host == "another-host"
    assert "broke the lock of someone@another-host pid 4242" in hdfs_load.format_summary(report)


def test_a_reused_pid_is_not_the_lock_holder():
    with subprocess.Popen(["sleep", "60"]) as other:
        try:
            started = hdfs_load.process_start(other.pid)
            assert started is not None
            here = socket.gethostname()
            assert hdfs_load.Owner("r", here, other.pid, "u", "t", started).running() is True
            assert hdfs_load.Owner("r", here, other.pid, "u", "t", started - 1).running() is False
            assert hdfs_load.Owner("r", here, other.pid, "u", "t", None).running() is True  # an older lock
        finally:
            other.kill()


@pytest.mark.hdfs
def test_a_running_load_renews_its_lease(tmp_path, hdfs_tmp):
    root = make_tree(tmp_path / "chest_xray", 2)
    target = f"{hdfs_tmp}/chest_xray"
    fs = storage.hdfs_filesystem(target)
    lock = f"{hdfs_load.resolve_target(target).path}/{hdfs_load.LOCK_NAME}"
    renewed: list[int] = []

    def wait_for_a_renewal(f: LocalFile) -> None:
        if renewed:
            return
        first = fs.status(lock)["modificationTime"]
        deadline = time.monotonic() + 60
        while fs.status(lock)["modificationTime"] == first and time.monotonic() < deadline:
            time.sleep(0.1)
        renewed.append(fs.status(lock)["modificationTime"] - first)

    report = hdfs_load.load_tree(
        root, target, via="webhdfs", workers=1, progress=False, lock_lease_s=2, on_placed=wait_for_a_renewal
    )
    assert report.ok and renewed[0] > 0


@pytest.mark.hdfs
def test_a_load_whose_lock_is_taken_stops(tmp_path, hdfs_tmp):
    n = 60
    root = make_tree(tmp_path / "chest_xray", n)
    target = f"{hdfs_tmp}/chest_xray"
    loader = start_loader(root, target, "--via", "webhdfs", "--workers", "1", "--set", "hdfs_load.lock_lease_s=2")
    wait_for_placed(target, loader, 3)
    write_lock(target, "another-host", 4242)  # in one rename: what a --break-lock does, had the lease expired
    out, err = loader.communicate(timeout=300)
    assert loader.returncode == 4, out + err
    assert "this load lost its lock" in err and "now held by someone@another-host pid 4242" in err, err
    assert len(visible_files(target)) < n
    assert hdfs_load.Owner.from_json(storage.read_bytes(f"{target}/{hdfs_load.LOCK_NAME}")).host == "another-host"
