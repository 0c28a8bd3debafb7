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
import sys

from cxr_pipeline.cli import Command, Job, add_config_options, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pack_images.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="image tree root URI (default: conf data.uri)")
    parser.add_argument("--out", required=True, help="table URI to write (local path, file:// or hdfs://)")
    parser.add_argument("--target-file-mb", type=int, default=128, help="approximate Parquet file size (default 128)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing table")
    add_config_options(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def pack_images(job: Job) -> int:
    from cxr_pipeline import config as cfg
    from cxr_pipeline.images.dicom import DicomSettings
    from cxr_pipeline.spark.packing import pack_image_tree

    args, config = job.args, job.config
    dicom = DicomSettings.from_config(config)
    summary = pack_image_tree(
        job.spark,
        args.data or cfg.require(config, "data.uri"),
        args.out,
        target_file_mb=args.target_file_mb,
        max_pixels=int(cfg.require(config, "data.max_pixels")),
        overwrite=args.overwrite,
        dicom=dicom,
    )
    print("\n".join(summary.lines()))
    return 0


COMMAND = Command("pack_images", build_parser, pack_images, spark_app="cxr-pack-images")


def main(argv=None) -> int:
    return run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
