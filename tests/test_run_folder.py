"""All-or-nothing output folders (cxr_pipeline.infra.run_folder), locally and on the real HDFS."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from cxr_pipeline.infra import run_folder, storage

REPO = Path(__file__).resolve().parents[1]


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


# ------------------------------------------------------- a job killed while publishing
# A child process publishes a new run over the old one and SIGKILLs itself right after the step named:
# every storage change it makes prints one line ("rename run -> aside": the old run moved aside).
PUBLISH_AND_DIE = textwrap.dedent("""
    import os, signal, sys
    from cxr_pipeline.infra import run_folder, storage
    out, die_after = sys.argv[1], sys.argv[2]
    parent, name = out.rsplit("/", 1)

    def label(uri):
        first, _, rest = uri[len(parent) + 1 :].partition("/")
        if first.startswith(f".{name}.staging-"):
            first = "stage"
        elif first.startswith(f".{name}.replaced-"):
            first = "aside"
        return first + ("/" + rest if rest else "")

    def step(text):
        print(text, flush=True)
        if text == die_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def then_step(func, describe):
        def wrapper(*args, **kwargs):
            result = func(*args, **kwargs)
            step(describe(*args))
            return result
        return wrapper

    storage.rename = then_step(storage.rename, lambda src, dst: f"rename {label(src)} -> {label(dst)}")
    storage.delete = then_step(storage.delete, lambda uri, *_: f"delete {label(uri)}")
    storage.write_bytes = then_step(storage.write_bytes, lambda uri, _data: f"write {label(uri)}")
    with run_folder.staged_output(out, overwrite=True, tool="killed") as stage:
        storage.write_bytes(f"{stage}/classifier.json", b"new")
    print("finished", flush=True)
""")
PUBLISH_STEPS = [
    "write stage/classifier.json",
    "write stage/_SUCCESS",
    "rename run -> aside",
    "rename stage -> run",
    "delete aside/_SUCCESS",
    "delete aside",
    "finished",
]


def _publish_and_die(out: str, die_after: str) -> list[str]:
    """Runs PUBLISH_AND_DIE; returns the steps it made (it must have died right after ``die_after``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "lib"), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run(
        [sys.executable, "-c", PUBLISH_AND_DIE, out, die_after], capture_output=True, text=True, env=env, timeout=300
    )
    steps = child.stdout.split("\n")[:-1]
    assert child.returncode == -signal.SIGKILL, f"the child was not killed: {child.returncode}\n{child.stderr}"
    assert steps == PUBLISH_STEPS[: PUBLISH_STEPS.index(die_after) + 1], child.stderr
    return steps


@contextmanager
def leftovers_age(hours: float):
    run_folder.configure({"outputs": {"leftovers_age_hours": hours}})
    try:
        yield
    finally:
        run_folder.configure(None)


def _entries(parent: str) -> list[str]:
    return sorted(entry.name for entry in storage.list_folder(parent))


@pytest.mark.parametrize(
    "die_after, survivor",
    [
        ("write stage/classifier.json", b"old"),
        ("write stage/_SUCCESS", b"old"),
        ("rename run -> aside", b"old"),
        ("rename stage -> run", b"new"),
        ("delete aside/_SUCCESS", b"new"),
    ],
)
def test_a_job_killed_at_any_step_of_its_publish_leaves_a_run_that_readers_and_writers_find(
    parent, die_after, survivor
):
    out = f"{parent}/run"
    with run_folder.staged_output(out) as stage:
        _write_run(stage, "old")
    _publish_and_die(out, die_after)
    if die_after == "rename run -> aside":  # the instant no storage can avoid: neither run is at --out
        assert not storage.exists(out)
        assert [name.split("-")[0] for name in _entries(parent)] == [".run.replaced", ".run.staging"]

    run_folder.require_complete(out)  # the reader restores the old run before anything says "does not exist"
    assert storage.read_bytes(f"{out}/classifier.json") == survivor
    assert storage.exists(f"{out}/_SUCCESS")

    with leftovers_age(0):  # the next job writing there: the killed job's folders go, whatever their age
        with run_folder.staged_output(out, overwrite=True) as stage:
            _write_run(stage, "third")
    assert storage.read_bytes(f"{out}/classifier.json") == b"third"
    assert _entries(parent) == ["run"]


def test_a_writer_restores_the_old_run_before_it_checks_overwrite(parent):
    out = f"{parent}/run"
    with run_folder.staged_output(out) as stage:
        _write_run(stage, "old")
    _publish_and_die(out, "rename run -> aside")
    with pytest.raises(run_folder.OutputExistsError, match="--overwrite"):
        run_folder.check_output(out)  # the old run is back: without --overwrite it is not replaced
    assert storage.read_bytes(f"{out}/classifier.json") == b"old"


def test_leftovers_are_removed_only_past_their_age_and_never_another_kind_or_a_live_job(parent):
    out = f"{parent}/run"
    with run_folder.staged_output(out) as stage:
        _write_run(stage, "old")
    _publish_and_die(out, "write stage/_SUCCESS")  # a killed job's complete staging folder
    killed = [name for name in _entries(parent) if name.startswith(".run.staging-")]
    older_version = ".run.staging-0123456789"  # named as versions before this one named them
    foreign = [".run.staging-notes", ".run.replaced-by-hand", ".other.staging-1-1-host-0123abcd", "run.staging-x"]
    for name in (older_version, *foreign):
        storage.write_bytes(f"{parent}/{name}/part-0", b"x")
    storage.write_bytes(f"{parent}/.run.staging-5-5-h-0123abcd", b"a file, not a folder: not ours")

    with run_folder.staged_output(out, overwrite=True) as stage:  # the default age (48 h): all too young
        _write_run(stage, "second")
    assert set(killed + [older_version]) <= set(_entries(parent))

    with leftovers_age(0):
        with run_folder.staged_output(out, overwrite=True) as live:  # this process is a live job writing there
            with run_folder.staged_output(out, overwrite=True) as stage:
                _write_run(stage, "third")
            left = _entries(parent)
            assert live.rsplit("/", 1)[1] in left, "a live job's staging folder was removed"
            assert not set(killed + [older_version]) & set(left), "a killed job's staging folder was kept"
            assert set(foreign + [".run.staging-5-5-h-0123abcd"]) <= set(left), "another kind of file was removed"
            _write_run(live, "fourth")
    assert storage.read_bytes(f"{out}/classifier.json") == b"fourth"


def test_readers_never_find_neither_run_while_a_job_publishes_again_and_again(parent):
    out = f"{parent}/run"
    with run_folder.staged_output(out) as stage:
        _write_run(stage, "0")
    stop, failures, reads = threading.Event(), [], [0]

    def read_forever():
        while not stop.is_set():
            try:
                run_folder.require_complete(out)
                reads[0] += 1
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                failures.append(exc)

    reader = threading.Thread(target=read_forever)
    reader.start()
    try:
        publishes = 20 if not storage.is_remote(parent) else 6
        for number in range(1, publishes + 1):
            with run_folder.staged_output(out, overwrite=True) as stage:
                _write_run(stage, str(number))
    finally:
        stop.set()
        reader.join()
    assert not failures, failures[:3]
    assert reads[0] > 0
    assert storage.read_bytes(f"{out}/classifier.json") == str(publishes).encode()
    assert _entries(parent) == ["run"]


def test_a_pid_counts_as_running_only_for_a_process_started_by_then():
    import time

    assert run_folder.process_runs(os.getpid(), since=time.time())
    assert not run_folder.process_runs(os.getpid(), since=0)  # a leftover of 1970: this process only reuses the pid
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not run_folder.process_runs(child.pid, since=time.time())
