"""The README's commands, run as a new user runs them: in a new shell, from the repository root.

A fenced block right after ``<!-- readme-test -->`` (cheap: always run) or ``<!-- readme-test slow -->`` (the
slow ones, a user's first hour: train, predict, open the table, the registry) is run as written, with
``bash -euo pipefail``, in an environment holding only PATH (the system's, no venv) and HOME: ``env -i``.
Two things differ from a user's shell, so that a test never touches what a user has:

* every ``hdfs://127.0.0.1:9000/...`` in a block moves under a fresh ``/tests/<id>/`` folder of the local HDFS;
* MLflow writes to this test session's store (``MLFLOW_TRACKING_URI``), not ``.local/mlflow``.

Where several checkouts share one venv (its ``cxr_pipeline`` is another checkout's), PYTHONPATH names this
checkout's ``lib/``. The slow blocks run in README order in one sandbox: a later one uses an earlier one's run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
HDFS_ROOT = "hdfs://127.0.0.1:9000/"
CLEAN_PATH = "/usr/local/bin:/usr/bin:/bin"
MARKED_BLOCK = re.compile(r"<!-- readme-test( slow)? -->\s*\n```(bash|python)\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class Block:
    line: int  # of the fence in README.md
    slow: bool
    language: str
    code: str

    @property
    def name(self) -> str:
        return f"README.md:{self.line}"


def readme_blocks(text: str) -> list[Block]:
    """The marked fenced blocks, in order."""
    return [
        Block(text.count("\n", 0, m.start(2)) + 1, bool(m.group(1)), m.group(2), m.group(3))
        for m in MARKED_BLOCK.finditer(text)
    ]


def in_sandbox(code: str, root: str) -> str:
    """The block with every URI on the local HDFS moved under ``root`` (``hdfs://127.0.0.1:9000/tests/<id>``)."""
    return code.replace(HDFS_ROOT, root.rstrip("/") + "/")


def clean_environment() -> dict[str, str]:
    env = {"PATH": CLEAN_PATH, "HOME": os.environ.get("HOME", "/root")}
    if "MLFLOW_TRACKING_URI" in os.environ:  # conftest: this session's store
        env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    installed = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "-c", "import cxr_pipeline; print(cxr_pipeline.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
    ).stdout.strip()
    if not installed.startswith(str(REPO / "lib")):  # a venv shared by several checkouts
        env["PYTHONPATH"] = str(REPO / "lib")
    return env


def venv_is_older_than_its_sources() -> bool:
    """make would reinstall .venv (the Makefile's venv stamp is older than setup.py or a requirements file): in a
    checkout sharing its venv with others, that points their editable install at this checkout."""
    stamp = REPO / ".venv" / ".installed"
    sources = [REPO / name for name in ("setup.py", "requirements.txt", "requirements-dev.txt")]
    return not stamp.exists() or any(s.stat().st_mtime > stamp.stat().st_mtime for s in sources)


def run_block(block: Block, env: dict[str, str], root: str | None = None, timeout: int = 300):
    code = in_sandbox(block.code, root) if root else block.code
    if re.search(r"(^|[;&|(\s])make\s", code) and venv_is_older_than_its_sources():
        pytest.skip(f"{block.name} runs make, which would reinstall .venv here: run `make venv` first")
    if block.language == "python":
        command = [str(REPO / ".venv" / "bin" / "python"), "-c", code]
    else:
        command = ["bash", "-euo", "pipefail", "-c", code]
    proc = subprocess.run(["env", "-i", *(f"{k}={v}" for k, v in env.items()), *command], **_captured(timeout))
    assert (
        proc.returncode == 0
    ), f"{block.name} failed (exit {proc.returncode}):\n{code}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def _captured(timeout: int) -> dict:
    return {"cwd": REPO, "capture_output": True, "text": True, "timeout": timeout}


BLOCKS = readme_blocks(README.read_text())


# ------------------------------------------------------------------ the mechanism itself


def test_marked_blocks_are_found_with_their_line_and_kind():
    text = (
        "intro\n<!-- readme-test -->\n```bash\necho a\n```\n\n```bash\nnot marked\n```\n"
        "<!-- readme-test slow -->\n```python\nprint(1)\n```\n"
    )
    found = readme_blocks(text)
    assert [(b.line, b.slow, b.language, b.code) for b in found] == [
        (3, False, "bash", "echo a\n"),
        (11, True, "python", "print(1)\n"),
    ]
    assert in_sandbox("x hdfs://127.0.0.1:9000/runs/demo y", "hdfs://127.0.0.1:9000/tests/ab") == (
        "x hdfs://127.0.0.1:9000/tests/ab/runs/demo y"
    )


def test_a_failing_block_fails_the_test():
    with pytest.raises(AssertionError, match="README.md:7 failed"):
        run_block(Block(7, False, "bash", "false\n"), clean_environment())


def test_the_readme_marks_cheap_and_slow_commands():
    assert [b for b in BLOCKS if not b.slow] and [b for b in BLOCKS if b.slow]


# ------------------------------------------------------------------ the README's commands


@pytest.mark.parametrize("block", [b for b in BLOCKS if not b.slow], ids=lambda b: b.name)
def test_readme_command(block):
    run_block(block, clean_environment())


@pytest.mark.slow
@pytest.mark.hdfs
@pytest.mark.timeout(3600)
def test_readme_first_hour_in_a_clean_shell(hdfs_cluster, sample_tree):
    """Set-up done, a new shell: load, train, predict, open the predictions, use the champion, as the README says."""
    from cxr_pipeline.infra import storage

    root = f"{hdfs_cluster.namenode_uri}/tests/readme-{uuid.uuid4().hex[:8]}"
    env = clean_environment()
    try:
        for block in [b for b in BLOCKS if b.slow]:
            proc = run_block(block, env, root, timeout=1800)
            print(f"--- {block.name}\n{proc.stdout[-2000:]}", file=sys.stderr)
    finally:
        storage.delete(root, recursive=True)


# ------------------------------------------------------------------ what a user sees when a path is wrong


@pytest.mark.hdfs
def test_a_local_path_that_is_a_run_on_hdfs_says_so(hdfs_tmp):
    """`make serve MODEL=runs/demo` when the demo run is on HDFS: the error names the HDFS URI to use."""
    from cxr_pipeline.infra import storage

    storage.write_bytes(f"{hdfs_tmp}/runs/demo/_SUCCESS", b"")
    relative = hdfs_tmp.split("://", 1)[1].split("/", 1)[1] + "/runs/demo"  # tests/<id>/runs/demo
    env = {**os.environ, "PYTHONPATH": str(REPO / "lib")}
    proc = subprocess.run(
        [sys.executable, "-m", "cxr_pipeline.serving", "--model", relative], env=env, **_captured(300)
    )
    assert proc.returncode == 2
    assert f"{relative} does not exist on this machine; {hdfs_tmp}/runs/demo does: pass that URI" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "cxr_pipeline.serving", "--model", "no/such/run"], env=env, **_captured(300)
    )
    assert proc.returncode == 2 and "no/such/run does not exist on this machine" in proc.stderr
    assert "does: pass" not in proc.stderr
