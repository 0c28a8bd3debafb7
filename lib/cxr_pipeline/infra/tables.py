"""Any table a job writes, opened in pandas from its URI (local path, ``file://`` or ``hdfs://``).

    from cxr_pipeline.infra.tables import read_table
    predictions = read_table("hdfs://127.0.0.1:9000/predictions/demo/predictions.parquet")

``pd.read_parquet("hdfs://...")`` needs pyarrow's libhdfs and a JVM; this reads the files through
:mod:`cxr_pipeline.infra.storage` (WebHDFS), so it works wherever the jobs' own Python does. A URI can be one
Parquet or CSV file, or a folder Spark wrote (``predictions.parquet/``, ``predictions_csv/``): its part
files are read in name order, and ``_SUCCESS``, ``.crc`` and other hidden files are left out.

From a shell: ``.venv/bin/python -m cxr_pipeline.infra.tables URI [--csv OUT.csv]`` prints the table (or writes it).
"""

from __future__ import annotations

import argparse
import io
import posixpath
import sys
from typing import TYPE_CHECKING

from ..cli import Command, Job, add_config_options, run

if TYPE_CHECKING:
    import pandas as pd

FORMATS = (".parquet", ".csv")


def table_format(uri: str) -> str:
    """``parquet`` or ``csv`` from the name (``predictions_csv`` is a CSV folder); ValueError otherwise."""
    name = posixpath.basename(str(uri).rstrip("/")).lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".csv") or name.endswith("_csv"):
        return "csv"
    raise ValueError(f"{uri}: not a table this can read (a .parquet or .csv file, or a folder Spark wrote them to)")


def part_files(uri: str) -> list[str]:
    """The data files of a table: ``uri`` itself when it is a file, else the visible files of the folder."""
    from . import storage

    root = str(uri).rstrip("/")
    listed = storage.list_files(root, recursive=True)
    if len(listed) == 1 and listed[0].uri.rstrip("/") == root:
        return [root]
    parts = [info.uri for info in listed if not posixpath.basename(info.uri).startswith(("_", "."))]
    return sorted(p for p in parts if not p.endswith(".crc"))


def read_table(uri: str, columns: list[str] | None = None) -> pd.DataFrame:
    """The table at ``uri`` as one pandas DataFrame (``columns``: only these)."""
    import pandas as pd

    from . import storage

    kind = table_format(uri)
    parts = part_files(uri)
    if not parts:
        raise FileNotFoundError(f"{uri}: no data files in it")
    frames = []
    for part in parts:
        data = io.BytesIO(storage.read_bytes(part))
        if kind == "parquet":
            frames.append(pd.read_parquet(data, columns=columns))
        else:
            frames.append(pd.read_csv(data, usecols=columns))
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cxr_pipeline.infra.tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("uri", help="a .parquet/.csv file or folder (local path, file:// or hdfs://)")
    parser.add_argument("--csv", metavar="OUT", help="write the table to this local CSV file instead of printing it")
    add_config_options(parser, spark=False, verbose=False)
    return parser


def _show(job: Job) -> int:
    table = read_table(job.args.uri)
    if job.args.csv:
        table.to_csv(job.args.csv, index=False)
        print(f"{len(table)} rows -> {job.args.csv}")
    else:
        import pandas as pd

        with pd.option_context("display.max_rows", 50, "display.width", 160, "display.max_colwidth", 80):
            print(table)
    return 0


COMMAND = Command("tables", build_parser, _show, errors=lambda: (ValueError, OSError))


def main(argv=None) -> int:
    return run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
