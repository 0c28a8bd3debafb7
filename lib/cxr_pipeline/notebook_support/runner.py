"""Run a Databricks source-format notebook top to bottom, outside Databricks.

    python -m cxr_pipeline.notebook_support.runner notebooks/01_explore.py [--out DIR] [--param name=value]...

A Databricks "source" notebook is a ``.py`` file that starts with
``# Databricks notebook source`` and separates cells with ``# COMMAND ----------``.
Markdown and other magic cells are written as ``# MAGIC %md`` / ``# MAGIC ...`` lines.

The runner executes the code cells in order in one namespace (as the notebook
would), skips markdown cells, prints each cell's wall time, and stops at the
first failing cell with its number and traceback (exit status 1). Cells that
need Databricks itself (``%sh``, ``%pip``, ``%run``, ``%sql``, ...) are refused
with a message saying so, unless ``--skip-magics`` is given.

``--out DIR`` sets ``CXR_NOTEBOOK_OUT=DIR/<notebook name>`` so that
:func:`cxr_pipeline.notebook_support.display_or_save` writes the plots there,
and a ``cells.json`` with per-cell status and timing is written next to them.
``--param name=value`` sets ``CXR_<NAME>`` for
:func:`cxr_pipeline.notebook_support.get_param` (a notebook's widgets).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..cli import Command, Job, UsageError, add_config_options, run

HEADER = "# Databricks notebook source"
SEPARATOR = "# COMMAND ----------"
MAGIC_PREFIX = "# MAGIC"
MARKDOWN_MAGICS = ("%md", "%md-sandbox")
# Python magic cells are run as code; every other magic needs a Databricks cluster.
PYTHON_MAGICS = ("%python",)


class NotebookFormatError(ValueError):
    """The file is not a Databricks source-format notebook."""


class UnsupportedMagicError(RuntimeError):
    """A cell uses a magic (``%sh``, ``%pip``, ...) that only Databricks can run."""


@dataclass
class Cell:
    number: int  # 1-based, counting every cell (markdown too), as Databricks shows them
    kind: str  # "code" | "markdown" | "magic"
    source: str  # code to run (MAGIC prefixes stripped for magic cells)
    first_line: int  # 1-based line of the cell's first line in the file
    magic: str | None = None  # "%md", "%sh", ... for magic cells


@dataclass
class CellResult:
    number: int
    kind: str
    status: str  # "ok" | "skipped" | "error"
    seconds: float = 0.0
    message: str = ""


@dataclass
class NotebookResult:
    path: str
    cells: list[CellResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != "error" for c in self.cells)

    @property
    def failed_cell(self) -> CellResult | None:
        return next((c for c in self.cells if c.status == "error"), None)


def _strip_magic(line: str) -> str:
    rest = line[len(MAGIC_PREFIX) :]
    return rest[1:] if rest.startswith(" ") else rest


def _classify(lines: list[str]) -> tuple[str, str | None, str]:
    """(kind, magic, source) of one cell's lines."""
    meaningful = [line for line in lines if line.strip()]
    if meaningful and all(line.startswith(MAGIC_PREFIX) for line in meaningful):
        body = [_strip_magic(line) if line.startswith(MAGIC_PREFIX) else line for line in lines]
        first = next(line for line in body if line.strip()).strip()
        magic = first.split()[0] if first.startswith("%") else None
        if magic in MARKDOWN_MAGICS:
            return "markdown", magic, "\n".join(body)
        if magic in PYTHON_MAGICS:
            code = "\n".join(body).replace(magic, "", 1)
            return "code", None, code
        return "magic", magic, "\n".join(body)
    return "code", None, "\n".join(lines)


def parse_notebook(text: str) -> list[Cell]:
    """The cells of a Databricks source-format notebook."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != HEADER:
        raise NotebookFormatError(f"not a Databricks source notebook: the first line must be {HEADER!r}")
    cells: list[Cell] = []
    chunk: list[tuple[int, str]] = []  # (1-based line number, text)

    def flush() -> None:
        # Blank lines around a separator belong to the format, not the cell.
        while chunk and not chunk[0][1].strip():
            chunk.pop(0)
        while chunk and not chunk[-1][1].strip():
            chunk.pop()
        if chunk:
            kind, magic, source = _classify([text for _, text in chunk])
            cells.append(Cell(number=len(cells) + 1, kind=kind, source=source, first_line=chunk[0][0], magic=magic))

    for line_number, line in enumerate(lines[1:], start=2):
        if line.strip() == SEPARATOR:
            flush()
            chunk = []
        else:
            chunk.append((line_number, line))
    flush()
    return cells


def parse_notebook_file(path: str | os.PathLike) -> list[Cell]:
    try:
        return parse_notebook(Path(path).read_text(encoding="utf-8"))
    except NotebookFormatError as err:
        raise NotebookFormatError(f"{path}: {err}") from None


def _check_magics(cells: Sequence[Cell], skip_magics: bool) -> None:
    refused = [c for c in cells if c.kind == "magic"]
    if refused and not skip_magics:
        listing = ", ".join(f"cell {c.number} ({c.magic or 'unknown magic'})" for c in refused)
        raise UnsupportedMagicError(
            f"{listing}: magic commands such as %sh and %pip run only on Databricks. "
            "Install packages into the local venv instead (make venv), or pass --skip-magics to skip these cells."
        )


def run_cells(
    cells: Sequence[Cell],
    notebook_path: str = "<notebook>",
    namespace: dict | None = None,
    skip_magics: bool = False,
    log=print,
) -> NotebookResult:
    """Execute the code cells in order in one namespace; stop at the first error."""
    _check_magics(cells, skip_magics)
    namespace = namespace if namespace is not None else {"__name__": "__main__", "__file__": str(notebook_path)}
    result = NotebookResult(path=str(notebook_path))
    total = len(cells)
    for cell in cells:
        if cell.kind != "code":
            what = "markdown" if cell.kind == "markdown" else f"{cell.magic} skipped"
            result.cells.append(CellResult(cell.number, cell.kind, "skipped", message=what))
            continue
        # Pad with newlines so tracebacks give the line number in the notebook file.
        code = "\n" * (cell.first_line - 1) + cell.source
        started = time.perf_counter()
        try:
            exec(compile(code, str(notebook_path), "exec"), namespace)  # noqa: S102 - running the notebook is the point
        except BaseException as err:  # noqa: BLE001 - report any cell failure, KeyboardInterrupt included
            seconds = time.perf_counter() - started
            tb = traceback.format_exc()
            result.cells.append(CellResult(cell.number, cell.kind, "error", seconds, tb))
            log(
                f"[cell {cell.number}/{total}] FAILED after {seconds:.1f}s "
                f"(line {cell.first_line} of {notebook_path}): {type(err).__name__}: {err}"
            )
            log(tb)
            return result
        seconds = time.perf_counter() - started
        result.cells.append(CellResult(cell.number, cell.kind, "ok", seconds))
        log(f"[cell {cell.number}/{total}] ok in {seconds:.1f}s")
    return result


def run_notebook(
    path: str | os.PathLike, out_dir: str | os.PathLike | None = None, skip_magics: bool = False, log=print
) -> NotebookResult:
    """Run one notebook file; plots and ``cells.json`` go to ``out_dir`` when given."""
    path = Path(path)
    cells = parse_notebook_file(path)
    previous_out = os.environ.get("CXR_NOTEBOOK_OUT")
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        os.environ["CXR_NOTEBOOK_OUT"] = str(out_dir)
    log(f"== {path} ({sum(c.kind == 'code' for c in cells)} code cells of {len(cells)})")
    started = time.perf_counter()
    try:
        result = run_cells(cells, str(path), skip_magics=skip_magics, log=log)
    finally:
        if out_dir is not None:
            if previous_out is None:
                os.environ.pop("CXR_NOTEBOOK_OUT", None)
            else:
                os.environ["CXR_NOTEBOOK_OUT"] = previous_out
    log(f"== {path}: {'ok' if result.ok else 'FAILED'} in {time.perf_counter() - started:.1f}s")
    if out_dir is not None:
        report = {"notebook": str(path), "ok": result.ok, "cells": [asdict(c) for c in result.cells]}
        (Path(out_dir) / "cells.json").write_text(json.dumps(report, indent=2))
    return result


def _param_env(assignments: Iterable[str]) -> dict[str, str]:
    from . import env_var_name

    env = {}
    for text in assignments:
        if "=" not in text:
            raise UsageError(f"--param {text!r} must look like name=value")
        name, value = text.split("=", 1)
        env[env_var_name(name.strip())] = value
    return env


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cxr_pipeline.notebook_support.runner",
        description="Run Databricks source-format notebooks locally, top to bottom, stopping at the first "
        "failing cell. --conf-env is the notebooks' conf_env parameter; --conf and --set reach every "
        "notebook's config.",
    )
    parser.add_argument("notebooks", nargs="+", help="notebook .py files in Databricks source format")
    parser.add_argument("--out", help="folder for plots and cells.json; each notebook gets DIR/<notebook name>/")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a notebook parameter (widget), passed as env var CXR_<NAME>; repeatable",
    )
    parser.add_argument(
        "--skip-magics", action="store_true", help="skip %%sh/%%pip/%%run/... cells instead of refusing the notebook"
    )
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="run the remaining notebooks after one fails (the exit status still says it failed)",
    )
    add_config_options(parser, spark=False, verbose=False)
    return parser


def run_notebooks(job: Job) -> int:
    """Each notebook in turn: exit 2 when one cannot be run at all, 1 when a cell failed."""
    from .shim import CONF_FILES_VAR, CONF_SET_VAR

    args = job.args
    os.environ.update(_param_env(args.param))
    if args.conf_env:
        os.environ.update(_param_env([f"conf_env={args.conf_env}"]))
    os.environ[CONF_FILES_VAR] = os.pathsep.join(str(Path(f).resolve()) for f in args.conf)
    os.environ[CONF_SET_VAR] = "\n".join(args.set)
    # Plots go to files; no window to open on a CI machine.
    os.environ.setdefault("MPLBACKEND", "Agg")
    status = 0
    for notebook in args.notebooks:
        out_dir = Path(args.out) / Path(notebook).stem if args.out else None
        try:
            result = run_notebook(notebook, out_dir, skip_magics=args.skip_magics)
        except (NotebookFormatError, UnsupportedMagicError, OSError) as err:
            print(f"{job.command.name}: error: {err}", file=sys.stderr)
            status = status or 2
        else:
            if not result.ok:
                print(
                    f"{job.command.name}: error: {notebook}: cell {result.failed_cell.number} failed", file=sys.stderr
                )
                status = status or 1
        if status and not args.keep_going:
            break
    return status


COMMAND = Command("notebook runner", build_parser, run_notebooks)


def main(argv: Sequence[str] | None = None) -> int:
    return run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
