"""cxr_pipeline.infra.storage on the local filesystem (plain paths, file://) and the real local HDFS."""

from __future__ import annotations

import dataclasses
import os
import socket
import struct
import threading
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from cxr_pipeline.infra import storage
from cxr_pipeline.infra.localstack.processes import free_port

PAYLOAD = bytes(range(256)) * 64 + b"\x00tail\xff"  # every byte value, 16 KiB + a tail


@pytest.fixture(
    params=[
        "path",
        "file_uri",
        pytest.param("hdfs", marks=pytest.mark.hdfs),
    ]
)
def root(request, tmp_path) -> str:
    """A fresh, empty folder URI in each storage form."""
    if request.param == "path":
        return str(tmp_path / "store")
    if request.param == "file_uri":
        return f"file://{tmp_path}/store"
    return request.getfixturevalue("hdfs_tmp")


def hidden_leftovers(root: str) -> list[str]:
    return [info.uri for info in storage.list_files(root) if info.name.startswith(".")]


# ----------------------------------------------------------------- pure URI helpers
def test_is_remote():
    assert storage.is_remote("hdfs://127.0.0.1:9000/x")
    assert storage.is_remote("s3a://bucket/x")
    assert not storage.is_remote("/tmp/x")
    assert not storage.is_remote("relative/x")
    assert not storage.is_remote("file:///tmp/x")
    assert not storage.is_remote(Path("/tmp/x"))


def test_join_keeps_scheme_and_strips_extra_slashes():
    assert storage.join("hdfs://nn:9000/data/", "/train/", "a.jpeg") == "hdfs://nn:9000/data/train/a.jpeg"
    assert storage.join("hdfs://nn:9000", "data") == "hdfs://nn:9000/data"
    assert storage.join("file:///tmp", "a", "b") == "file:///tmp/a/b"
    assert storage.join("/", "a") == "/a"
    assert storage.join("rel", "b") == "rel/b"
    assert storage.join("/x/y") == "/x/y"


def test_to_local_path():
    assert storage.to_local_path("file:///tmp/a b/c.jpeg") == Path("/tmp/a b/c.jpeg")
    assert storage.to_local_path("file:/tmp/c") == Path("/tmp/c")
    assert storage.to_local_path("/tmp/c") == Path("/tmp/c")
    assert storage.to_local_path("file:///tmp/odd #name?.jpeg") == Path("/tmp/odd #name?.jpeg")
    with pytest.raises(ValueError, match="not a local path"):
        storage.to_local_path("hdfs://127.0.0.1:9000/x")


def test_unsupported_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="s3a"):
        storage.read_bytes("s3a://bucket/key")


def test_webhdfs_url_resolution_order(monkeypatch):
    authority = f"127.0.0.1:{free_port()}"
    monkeypatch.delenv("CXR_WEBHDFS_URL", raising=False)
    assert storage.webhdfs_url_for(f"hdfs://{authority}/x") == "http://127.0.0.1:9870"
    monkeypatch.setenv("CXR_WEBHDFS_URL", "http://example.invalid:1234/")
    assert storage.webhdfs_url_for(f"hdfs://{authority}/x") == "http://example.invalid:1234"
    storage.register_webhdfs(f"hdfs://{authority}", "http://127.0.0.1:5555")
    assert storage.webhdfs_url_for(f"hdfs://{authority}/x") == "http://127.0.0.1:5555"


def test_unreachable_namenode_raises_storage_unavailable():
    authority = f"127.0.0.1:{free_port()}"
    dead_url = f"http://127.0.0.1:{free_port()}"
    storage.register_webhdfs(f"hdfs://{authority}", dead_url)
    with pytest.raises(storage.StorageUnavailable) as caught:
        storage.read_bytes(f"hdfs://{authority}/anything")
    assert isinstance(caught.value, OSError)
    assert dead_url in str(caught.value) and "make hdfs-up" in str(caught.value)
    with pytest.raises(storage.StorageUnavailable):
        storage.list_files(f"hdfs://{authority}/")


@pytest.mark.hdfs
def test_webhdfs_of_another_namenode_is_refused(hdfs_cluster):
    # hdfs://127.0.0.1:<port> with no registration would be guessed to be the default
    # WebHDFS (9870), which serves the NameNode on 9000: a different filesystem.
    authority = f"127.0.0.1:{free_port()}"
    with pytest.raises(storage.StorageError, match="belongs to the NameNode"):
        storage.exists(f"hdfs://{authority}/x")


# ------------------------------------------------- API round trips, every backend
def test_write_then_read_bytes_is_identical_and_atomic(root):
    uri = storage.join(root, "nested", "deeper", "blob.bin")
    storage.write_bytes(uri, PAYLOAD)
    assert storage.read_bytes(uri) == PAYLOAD
    storage.write_bytes(uri, b"replaced")
    assert storage.read_bytes(uri) == b"replaced"
    assert hidden_leftovers(root) == []


def test_empty_file_round_trip(root):
    uri = storage.join(root, "empty")
    storage.write_bytes(uri, b"")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b""
    assert storage.list_files(uri)[0].size == 0


def test_list_files_recursive_and_flat(root):
    storage.write_bytes(storage.join(root, "a.bin"), b"1")
    storage.write_bytes(storage.join(root, "sub", "b.bin"), b"22")
    storage.write_bytes(storage.join(root, "sub", "deep", "c.bin"), b"333")
    storage.makedirs(storage.join(root, "empty_dir"))

    everything = storage.list_files(root)
    assert [(i.uri, i.size) for i in everything] == [
        (storage.join(root, "a.bin"), 1),
        (storage.join(root, "sub", "b.bin"), 2),
        (storage.join(root, "sub", "deep", "c.bin"), 3),
    ]
    assert [i.uri for i in storage.list_files(root, recursive=False)] == [storage.join(root, "a.bin")]
    single = storage.join(root, "sub", "b.bin")
    assert storage.list_files(single) == [storage.FileInfo(single, 2)]


def test_missing_things_raise_file_not_found(root):
    missing = storage.join(root, "nope")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(missing)
    with pytest.raises(FileNotFoundError):
        storage.list_files(missing)
    with pytest.raises(FileNotFoundError):
        storage.download_file(missing, "/tmp/never-written-by-storage-tests")
    assert not os.path.exists("/tmp/never-written-by-storage-tests")


def test_upload_and_download_file_byte_identical(root, tmp_path):
    source = tmp_path / "in.bin"
    source.write_bytes(PAYLOAD)
    uri = storage.join(root, "up", "in.bin")
    storage.upload_file(source, uri)
    assert storage.read_bytes(uri) == PAYLOAD
    target = tmp_path / "out" / "copy.bin"
    storage.download_file(uri, target)
    assert target.read_bytes() == PAYLOAD
    assert sorted(p.name for p in target.parent.iterdir()) == ["copy.bin"]  # no temp file left
    with pytest.raises(FileNotFoundError):
        storage.upload_file(tmp_path / "absent.bin", uri)


def test_upload_and_download_dir_tree(root, tmp_path):
    tree = tmp_path / "tree"
    files = {"x.bin": PAYLOAD, "NORMAL/a.jpeg": b"\xff\xd8normal", "PNEUMONIA/deep/b.jpeg": b"\xff\xd8pneu"}
    for relative, data in files.items():
        (tree / relative).parent.mkdir(parents=True, exist_ok=True)
        (tree / relative).write_bytes(data)

    written = storage.upload_dir(tree, storage.join(root, "copy"))
    assert sorted(written) == sorted(storage.join(root, "copy", r) for r in files)
    for relative, data in files.items():
        assert storage.read_bytes(storage.join(root, "copy", relative)) == data

    back = tmp_path / "back"
    local_paths = storage.download_dir(storage.join(root, "copy") + "/", back)
    assert sorted(local_paths) == sorted(back / r for r in files)
    for relative, data in files.items():
        assert (back / relative).read_bytes() == data
    single = storage.download_dir(storage.join(root, "copy", "x.bin"), tmp_path / "single")
    assert single == [tmp_path / "single" / "x.bin"] and single[0].read_bytes() == PAYLOAD


def test_exists_makedirs_delete(root):
    folder = storage.join(root, "d1", "d2")
    assert not storage.exists(folder)
    storage.makedirs(folder)
    storage.makedirs(folder)  # idempotent
    assert storage.exists(folder)
    assert storage.list_files(folder) == []

    blob = storage.join(folder, "f.bin")
    storage.write_bytes(blob, b"x")
    with pytest.raises(OSError):
        storage.delete(storage.join(root, "d1"))  # not empty, not recursive
    assert storage.exists(blob)
    assert storage.delete(blob) is True
    assert not storage.exists(blob)
    assert storage.delete(blob) is False
    storage.write_bytes(blob, b"x")
    assert storage.delete(storage.join(root, "d1"), recursive=True) is True
    assert not storage.exists(storage.join(root, "d1"))


def test_rename_file_and_folder(root):
    storage.write_bytes(storage.join(root, "src", "f.bin"), PAYLOAD)
    storage.rename(storage.join(root, "src", "f.bin"), storage.join(root, "moved", "g.bin"))
    assert storage.read_bytes(storage.join(root, "moved", "g.bin")) == PAYLOAD
    assert not storage.exists(storage.join(root, "src", "f.bin"))

    storage.rename(storage.join(root, "moved"), storage.join(root, "final"))
    assert storage.read_bytes(storage.join(root, "final", "g.bin")) == PAYLOAD

    storage.write_bytes(storage.join(root, "other"), b"o")
    with pytest.raises(FileExistsError):
        storage.rename(storage.join(root, "other"), storage.join(root, "final"))
    with pytest.raises(FileNotFoundError):
        storage.rename(storage.join(root, "ghost"), storage.join(root, "ghost2"))


def test_list_folder_gives_files_and_folders_with_their_modification_times(root):
    import time

    before = time.time()
    storage.write_bytes(storage.join(root, "sub", "deep.bin"), b"d")
    storage.write_bytes(storage.join(root, ".hidden"), b"h")
    entries = storage.list_folder(root)
    assert [(e.name, e.is_dir) for e in entries] == [(".hidden", False), ("sub", True)]
    assert all(e.uri == storage.join(root, e.name) for e in entries)
    assert all(before - 5 <= e.modified <= time.time() + 5 for e in entries)  # clocks of one machine
    with pytest.raises(FileNotFoundError):
        storage.list_folder(storage.join(root, "ghost"))


def test_a_folder_that_appears_at_the_destination_is_never_renamed_into(root):
    """The backends' own rename refuses a destination that appeared after storage.rename looked: HDFS's plain
    rename would move the source into that folder."""
    storage.write_bytes(storage.join(root, "src", "f.bin"), b"src")
    storage.write_bytes(storage.join(root, "dst", "g.bin"), b"dst")
    backend, src = storage._resolve(storage.join(root, "src"))
    _backend, dst = storage._resolve(storage.join(root, "dst"))
    with pytest.raises(FileExistsError):
        backend.rename(src, dst)
    assert [info.name for info in storage.list_files(storage.join(root, "dst"))] == ["g.bin"]
    assert storage.read_bytes(storage.join(root, "src", "f.bin")) == b"src"


@pytest.mark.hdfs
def test_hdfs_uri_without_authority_uses_the_configured_namenode(hdfs_tmp, tmp_path):
    path = hdfs_tmp.split("127.0.0.1:9000", 1)[1]
    storage.write_bytes(f"hdfs://{path}/no-authority.bin", b"via hdfs:///")
    storage.write_bytes(f"hdfs:{path}/hadoop-style.bin", b"via hdfs:/")
    assert storage.read_bytes(f"{hdfs_tmp}/no-authority.bin") == b"via hdfs:///"
    assert storage.read_bytes(f"{hdfs_tmp}//hadoop-style.bin") == b"via hdfs:/"
    assert [i.name for i in storage.list_files(f"hdfs://{path}")] == ["hadoop-style.bin", "no-authority.bin"]
    back = storage.download_dir(f"hdfs://{path}", tmp_path / "back")
    assert sorted(p.name for p in back) == ["hadoop-style.bin", "no-authority.bin"]


def test_rename_across_filesystems_is_refused(tmp_path):
    storage.write_bytes(tmp_path / "a", b"a")
    with pytest.raises(ValueError, match="across filesystems"):
        storage.rename(str(tmp_path / "a"), "hdfs://127.0.0.1:9000/a")


def test_local_listing_keeps_the_form_it_was_asked_in(tmp_path):
    storage.write_bytes(tmp_path / "f.bin", b"1")
    assert storage.list_files(str(tmp_path))[0].uri == str(tmp_path / "f.bin")
    assert storage.list_files(f"file://{tmp_path}")[0].uri == f"file://{tmp_path}/f.bin"
    assert storage.list_files(f"file:{tmp_path}")[0].uri == f"file:{tmp_path}/f.bin"


def test_hadoop_uri_matches_what_spark_reports(tmp_path):
    assert storage.hadoop_uri(tmp_path / "a b.jpeg") == f"file:{tmp_path}/a b.jpeg"
    assert storage.hadoop_uri(f"file://{tmp_path}/x") == f"file:{tmp_path}/x"
    assert storage.hadoop_uri("hdfs://127.0.0.1:9000/data//x/") == "hdfs://127.0.0.1:9000/data/x"


# ------------------------------------------------------------- Spark reads it back
@pytest.mark.hdfs
def test_spark_binary_file_reads_what_storage_wrote(spark, hdfs_tmp):
    blobs = {"a.bin": PAYLOAD, "b.bin": PAYLOAD[::-1], "sub dir/c d.bin": b"\x00" * 10}
    for relative, data in blobs.items():
        storage.write_bytes(storage.join(hdfs_tmp, relative), data)
    assert hdfs_tmp.startswith("hdfs://127.0.0.1:9000/")

    rows = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .load(hdfs_tmp)
        .select("path", "length", "content")
        .collect()
    )
    by_path = {row.path: row for row in rows}
    assert len(by_path) == len(blobs)  # the hidden temp names of the atomic writes are gone
    for relative, data in blobs.items():
        row = by_path[storage.hadoop_uri(storage.join(hdfs_tmp, relative))]
        assert row.length == len(data)
        assert bytes(row.content) == data


def test_lost_connection_is_recognised_in_hdfs_errors_and_stderr():
    from hdfs.util import HdfsError

    reset = HdfsError("Failed on local exception: java.net.SocketException: Connection reset", exception="IOException")
    assert storage.is_lost_connection(reset)
    assert storage.is_lost_connection(HdfsError("Call From a to b failed", exception="ConnectException"))
    assert storage.is_lost_connection("put: Call From vm/127.0.0.1 to localhost:9000 failed: Connection refused")
    assert not storage.is_lost_connection(HdfsError("/x does not exist", exception="FileNotFoundException"))
    assert not storage.is_lost_connection("put: Permission denied: user=x")


LOST_NAMENODE = (
    "Failed on local exception: java.net.SocketException: Connection reset; Host Details : "
    'local host is: "vm/127.0.0.1"; destination host is: "localhost":48833;'
)


def unreachable_hdfs() -> storage.HdfsFilesystem:
    """An HdfsFilesystem whose calls are never made: for the error translation only."""
    return storage.HdfsFilesystem(f"hdfs://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}")


@pytest.mark.parametrize(
    "kind, message, expected",
    [
        ("IOException", LOST_NAMENODE, storage.StorageUnavailable),
        ("ConnectException", "Call From vm to localhost:9000 failed", storage.StorageUnavailable),
        ("SafeModeException", "Name node is in safe mode.", storage.StorageUnavailable),
        ("RetriableException", "NameNode still not started", storage.StorageUnavailable),
        ("AccessControlException", "Permission denied: user=x", storage.StoragePermissionError),
        ("FileAlreadyExistsException", "/x for client 127.0.0.1 already exists", FileExistsError),
        ("FileNotFoundException", "File does not exist: /x", FileNotFoundError),
        ("IOException", "Quota exceeded", storage.StorageError),
    ],
)
def test_webhdfs_errors_are_translated(kind, message, expected):
    from hdfs.util import HdfsError

    def fail():
        raise HdfsError(message, exception=kind)

    with pytest.raises(OSError) as failure:
        unreachable_hdfs()._call("upload", "/data/a.jpeg", fail)
    assert type(failure.value) is expected
    assert "upload hdfs://127.0.0.1:" in str(failure.value) and "/data/a.jpeg" in str(failure.value)
    assert isinstance(storage.StoragePermissionError("x"), PermissionError)


@pytest.mark.parametrize("error", ["ConnectionError", "ChunkedEncodingError", "ReadTimeout"])
def test_transport_errors_mean_storage_unavailable(error):
    import requests

    def fail():
        raise getattr(requests.exceptions, error)("peer went away")

    with pytest.raises(storage.StorageUnavailable, match="make hdfs-up"):
        unreachable_hdfs()._call("upload", "/data/a.jpeg", fail)


def test_hadoop_command_errors_are_translated():
    def error(stderr: str) -> type:
        return type(storage.hadoop_command_error(stderr, "hdfs dfs -put", "hdfs://nn:9000"))

    assert error(f"put: {LOST_NAMENODE}") is storage.StorageUnavailable
    assert error("-put: java.net.UnknownHostException: namenode.example") is storage.StorageUnavailable
    assert error("put: Cannot create file. Name node is in safe mode.") is storage.StorageUnavailable
    assert error("put: Permission denied: user=x, access=WRITE") is storage.StoragePermissionError
    assert error("put: Quota exceeded") is storage.StorageError
    assert "hdfs dfs -put failed: put: Quota exceeded" in str(
        storage.hadoop_command_error("19/01/01 WARN noise\nput: Quota exceeded", "hdfs dfs -put")
    )


def test_check_namenode_names_the_silent_namenode():
    fs = unreachable_hdfs()
    with pytest.raises(
        storage.StorageUnavailable, match=f"NameNode at {fs.namenode_uri} does not answer.*make hdfs-up"
    ):
        fs.check_namenode()


@pytest.mark.hdfs
def test_hdfs_filesystem_exclusive_create_and_rename(hdfs_tmp):
    fs = storage.hdfs_filesystem(hdfs_tmp)
    base = hdfs_tmp.split("127.0.0.1:9000", 1)[1]
    fs.check_namenode()
    fs.create(f"{base}/lock", b"first", overwrite=False)
    with pytest.raises(FileExistsError):
        fs.create(f"{base}/lock", b"second", overwrite=False)
    assert fs.read_bytes(f"{base}/lock") == b"first"
    fs.create(f"{base}/new", b"new")
    with pytest.raises(FileExistsError):
        fs.rename_to(f"{base}/new", f"{base}/lock")
    fs.rename_to(f"{base}/new", f"{base}/lock", replace=True)
    assert fs.read_bytes(f"{base}/lock") == b"new" and not fs.exists(f"{base}/new")
    assert fs.content_summary(base)["fileCount"] == 1 and fs.content_summary(f"{base}/none") is None


# ------------------------------------------------- a DataNode that dies under a WebHDFS create/read
@contextmanager
def refusing_port():
    """A port bound but never listening: every connection to it is refused, like a just-stopped DataNode's."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@contextmanager
def dropping_port(after_bytes: int = 1024):
    """A port whose one connection is cut with a reset after ``after_bytes`` of the request: a DataNode dying
    mid-transfer."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(after_bytes)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        thread.join(timeout=5)


def first_redirect_to(fs: storage.HdfsFilesystem, port: int, monkeypatch) -> list[str]:
    """Send the first DataNode leg of ``fs`` to ``port`` instead of where the real NameNode said (later ones go
    where it says); returns every redirect the NameNode gave."""
    given: list[str] = []
    real = fs._namenode_redirect

    def redirect(*args):
        given.append(real(*args))
        if len(given) > 1:
            return given[-1]
        return urlunsplit(urlsplit(given[-1])._replace(netloc=f"127.0.0.1:{port}"))

    monkeypatch.setattr(fs, "_namenode_redirect", redirect)
    return given


def without_backoff(monkeypatch) -> None:
    """The configured retry count, with no pause between tries (storage reads ``hdfs.datanode_*`` per call)."""
    monkeypatch.setattr(
        storage.endpoints, "_active", dataclasses.replace(storage.hdfs_settings(), datanode_backoff_s=0)
    )


@pytest.fixture
def hdfs_fs(hdfs_tmp, monkeypatch) -> tuple[storage.HdfsFilesystem, str]:
    """(the real local HDFS, a fresh folder's absolute path in it); DataNode retries do not pause."""
    without_backoff(monkeypatch)
    return storage.hdfs_filesystem(hdfs_tmp), storage._split(hdfs_tmp).path


@pytest.mark.hdfs
def test_a_refused_datanode_is_left_for_another_redirect_on_create_and_read(hdfs_fs, tmp_path, monkeypatch):
    fs, base = hdfs_fs
    local = tmp_path / "blob.bin"
    local.write_bytes(PAYLOAD)
    with refusing_port() as port:
        redirects = first_redirect_to(fs, port, monkeypatch)
        fs.create(f"{base}/blob.bin", local, overwrite=True)
        assert len(redirects) == 2, "the create went back to the NameNode once"
        redirects = first_redirect_to(fs, port, monkeypatch)
        fs.create(f"{base}/lock", b"mine", overwrite=False)  # refused before sending: nothing created, retried
        assert len(redirects) == 2
    assert fs.read_bytes(f"{base}/lock") == b"mine"
    with refusing_port() as port:
        redirects = first_redirect_to(fs, port, monkeypatch)
        assert fs.read_bytes(f"{base}/blob.bin") == PAYLOAD
        assert len(redirects) == 2


@pytest.mark.hdfs
def test_a_create_cut_midway_sends_a_seekable_file_again_from_its_start(hdfs_fs, tmp_path, monkeypatch):
    fs, base = hdfs_fs
    local = tmp_path / "blob.bin"
    local.write_bytes(b"header-not-sent" + PAYLOAD * 4)
    with open(local, "rb") as stream, dropping_port() as port:
        stream.seek(len(b"header-not-sent"))
        redirects = first_redirect_to(fs, port, monkeypatch)
        fs.create(f"{base}/blob.bin", stream, overwrite=True)
    assert len(redirects) == 2
    assert fs.read_bytes(f"{base}/blob.bin") == PAYLOAD * 4


@pytest.mark.hdfs
def test_a_one_pass_stream_is_never_sent_twice(hdfs_fs, monkeypatch):
    fs, base = hdfs_fs
    with refusing_port() as port:
        redirects = first_redirect_to(fs, port, monkeypatch)
        with pytest.raises(storage.StorageError, match="one-pass stream, which cannot be sent again"):
            fs.create(f"{base}/stream.bin", (chunk for chunk in [PAYLOAD]), overwrite=True)
    assert len(redirects) == 1 and not fs.exists(f"{base}/stream.bin")


def test_a_silent_namenode_fails_at_once_without_datanode_retries(monkeypatch):
    fs = unreachable_hdfs()
    asked: list[tuple] = []
    real = fs._namenode_redirect
    monkeypatch.setattr(fs, "_namenode_redirect", lambda *args: asked.append(args) or real(*args))
    with pytest.raises(storage.StorageUnavailable, match="is HDFS running"):
        fs.create("/x", b"data", overwrite=True)
    with pytest.raises(storage.StorageUnavailable, match="is HDFS running"):
        fs.read_bytes("/x")
    assert [args[2] for args in asked] == ["CREATE", "OPEN"]  # once each: no DataNode retries


def test_datanode_retry_settings_come_from_the_config():
    defaults = storage.DatanodeRetry.from_config({})
    assert defaults.attempts >= 2 and defaults.backoff_s > 0
    assert storage.DatanodeRetry.from_config({"datanode_attempts": 1}).attempts == 1
    assert storage.DatanodeRetry.from_config({"datanode_backoff_s": 0.5}).pause(3) == 2.0
    with pytest.raises(ValueError, match="datanode_attempts must be >= 1"):
        storage.DatanodeRetry.from_config({"datanode_attempts": 0})
