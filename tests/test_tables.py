"""cxr_pipeline.infra.tables: a job's table opened in pandas from its URI (local, and the real local HDFS)."""

from __future__ import annotations

import pandas as pd
import pytest

from cxr_pipeline.infra import storage
from cxr_pipeline.infra.tables import read_table

FRAME = pd.DataFrame({"path": ["a.jpeg", "b.jpeg", "c.jpeg"], "probability": [0.1, 0.9, None]})


def spark_like_folder(root, kind: str) -> None:
    """What Spark leaves: part files, _SUCCESS, .crc files."""
    root.mkdir()
    (root / "_SUCCESS").write_bytes(b"")
    for index, part in enumerate((FRAME.iloc[:2], FRAME.iloc[2:])):
        name = f"part-0000{index}.{'snappy.parquet' if kind == 'parquet' else 'csv'}"
        if kind == "parquet":
            part.to_parquet(root / name)
        else:
            part.to_csv(root / name, index=False)
        (root / f".{name}.crc").write_bytes(b"crc")


@pytest.mark.parametrize("name,kind", [("predictions.parquet", "parquet"), ("predictions_csv", "csv")])
def test_a_spark_folder_reads_as_one_frame_in_part_order(tmp_path, name, kind):
    spark_like_folder(tmp_path / name, kind)
    pd.testing.assert_frame_equal(read_table(str(tmp_path / name)), FRAME)


def test_single_files_and_columns(tmp_path):
    FRAME.to_parquet(tmp_path / "t.parquet")
    FRAME.to_csv(tmp_path / "t.csv", index=False)
    pd.testing.assert_frame_equal(read_table(str(tmp_path / "t.parquet")), FRAME)
    pd.testing.assert_frame_equal(read_table(f"file://{tmp_path}/t.csv", columns=["path"]), FRAME[["path"]])


def test_what_is_not_a_table_says_so(tmp_path):
    with pytest.raises(ValueError, match="not a table"):
        read_table(str(tmp_path / "notes.txt"))
    (tmp_path / "empty.parquet").mkdir()
    (tmp_path / "empty.parquet" / "_SUCCESS").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no data files"):
        read_table(str(tmp_path / "empty.parquet"))


@pytest.mark.hdfs
def test_a_table_on_hdfs_opens_without_a_jvm(tmp_path, hdfs_tmp):
    spark_like_folder(tmp_path / "predictions.parquet", "parquet")
    storage.upload_dir(str(tmp_path / "predictions.parquet"), f"{hdfs_tmp}/predictions.parquet")
    pd.testing.assert_frame_equal(read_table(f"{hdfs_tmp}/predictions.parquet"), FRAME)
