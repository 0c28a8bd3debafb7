#!/usr/bin/env python
"""Pack a chest_xray image tree once into a Parquet image table.

    python jobs/pack_images.py --data hdfs://127.0.0.1:9000/data/chest_xray \\
        --out hdfs://127.0.0.1:9000/data/chest_xray.parquet

Later runs read the table instead of thousands of small files
(`--set data.source=parquet --set data.uri=<table>`, or read_images(spark, uri, "parquet")).
The table holds path, split, label, label_name, content, length, width, height,
format, sha256, patient, view_position, source_format; <out>/_rejected lists files
left out (path, reason) and <out>/_duplicates the exact duplicates (same sha256).
DICOM files are stored decoded and windowed, without their header: the patient is
the keyed hash of PatientID (dicom.patient_key), so the table holds no patient data.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers need this venv's Pillow

from cxr_pipeline import config as config_mod  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="image tree root URI (default: conf data.uri)")
    parser.add_argument("--out", required=True, help="table URI to write (local path, file:// or hdfs://)")
    parser.add_argument("--target-file-mb", type=int, default=128, help="approximate Parquet file size (default 128)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing table")
    parser.add_argument("--conf-env", default=None, help="conf/<env>.yaml on top of conf/defaults.yaml (default local)")
    parser.add_argument("--conf", action="append", default=[], metavar="FILE", help="extra YAML config file(s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = config_mod.load_config(args.conf_env, args.conf, args.set)
    from cxr_pipeline.dicom import DicomSettings
    from cxr_pipeline.spark.packing import pack_image_tree
    from cxr_pipeline.spark.session import spark_session

    spark = spark_session(config, app_name="cxr-pack-images")
    try:
        summary = pack_image_tree(
            spark,
            args.data or config_mod.get(config, "data.uri"),
            args.out,
            target_file_mb=args.target_file_mb,
            max_pixels=int(config_mod.get(config, "data.max_pixels", 60_000_000)),
            overwrite=args.overwrite,
            dicom=DicomSettings.from_config(config),
        )
    finally:
        spark.stop()
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
