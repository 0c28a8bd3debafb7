"""All-or-nothing output folders (cxr_pipeline.run_folder), locally and on the real HDFS."""

from __future__ import annotations

import pytest

from cxr_pipeline import run_folder, storage


class Boom(RuntimeError):
    pass


def _write_run(uri: str, marker: str) -> None:
    storage.write_bytes(f"{uri}/classifier.json", marker.encode())
    storage.write_bytes(f"{uri}/model/metadata/part-00000", marker.encode())


def _siblings(parent: str) -> list[str]:
    return sorted(f.uri for f in storage.list_files(parent, recursive=True))


@pytest.fixture(params=["local", pytest.param("hdfs", marks=pytest.mark.hdfs)])
def parent(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("hdfs_tmp")


def test_a_finished_run_is_published_with_success_last(parent):
    out = f"{parent}/run"
    with run_folder.staged_output(out, tool="test") as stage:
        assert stage != out and not storage.exists(out)
        _write_run(stage, "new")
    assert run_folder.is_complete(out)
    assert storage.read_bytes(f"{out}/classifier.json") == b"new"
    run_folder.require_complete(out)
    assert all("/run/" in uri for uri in _siblings(parent)), "a staging folder was left behind"


def test_a_failed_run_leaves_the_old_run_untouched(parent):
    out = f"{parent}/run"
    with run_folder.staged_output(out) as stage:
        _write_run(stage, "old")
    with pytest.raises(Boom):
        with run_folder.staged_output(out, overwrite=True) as stage:
            storage.write_bytes(f"{stage}/model/metadata/part-00000", b"half-new")
            raise Boom("the job died half-way")
    assert storage.read_bytes(f"{out}/classifier.json") == b"old"
    assert storage.read_bytes(f"{out}/model/metadata/part-00000") == b"old"
    assert run_folder.is_complete(out)
    assert all("/run/" in uri for uri in _siblings(parent)), "the failed run's staging folder was left behind"


def test_an_existing_run_is_refused_without_overwrite_and_replaced_with_it(parent):
    out = f"{parent}/run"
    with run_folder.staged_output(out) as stage:
        _write_run(stage, "old")
        storage.write_bytes(f"{stage}/only_in_old.txt", b"x")
    with pytest.raises(run_folder.OutputExistsError, match="--overwrite"):
        with run_folder.staged_output(out):
            pytest.fail("the block must not run when --out is taken")
    assert storage.read_bytes(f"{out}/classifier.json") == b"old"
    with run_folder.staged_output(out, overwrite=True) as stage:
        _write_run(stage, "new")
    assert storage.read_bytes(f"{out}/classifier.json") == b"new"
    assert not storage.exists(f"{out}/only_in_old.txt"), "the old run's files must not mix with the new ones"
    assert all("/run/" in uri for uri in _siblings(parent))


def test_overwrite_never_replaces_data_this_tool_did_not_write(parent):
    out = f"{parent}/someones_data"
    storage.write_bytes(f"{out}/scan_0001.jpeg", b"precious")
    with pytest.raises(run_folder.OutputExistsError, match="did not write"):
        with run_folder.staged_output(out, overwrite=True):
            pass
    assert storage.read_bytes(f"{out}/scan_0001.jpeg") == b"precious"


def test_an_empty_existing_folder_is_fine(parent):
    out = f"{parent}/empty"
    storage.makedirs(out)
    with run_folder.staged_output(out) as stage:
        _write_run(stage, "new")
    assert run_folder.is_complete(out)


def test_readers_refuse_a_folder_without_success(tmp_path):
    out = tmp_path / "half_written"
    _write_run(str(out), "half")
    with pytest.raises(run_folder.IncompleteRunError, match="_SUCCESS"):
        run_folder.require_complete(str(out))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_folder.require_complete(str(tmp_path / "typo"))
