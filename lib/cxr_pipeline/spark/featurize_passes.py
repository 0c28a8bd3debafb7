"""N passes of ImageFeaturizer over a tree, each written to OUT/pass-i (Parquet): the Spark driver that the
fault-injection runs start and disturb (``cxr_pipeline.infra.localstack.faults.run_featurize_passes``,
tests/test_faults.py, bench/bench_faults.py). Prints one JSON line per pass: index, seconds, failed tasks, table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..cli import Command, Job, add_config_options, run


def featurize_passes(job: Job) -> int:
    from pyspark.ml.functions import vector_to_array

    from .featurizer import ImageFeaturizer
    from .reader import read_images_with_rejections

    args = job.args
    job.config["spark"]["conf"] = {  # the harness watches this driver's UI on the port it chose
        **job.config["spark"]["conf"],
        "spark.ui.port": str(args.ui_port),
        "spark.port.maxRetries": "0",
        "spark.ui.showConsoleProgress": "false",
    }
    spark = job.spark
    spark.sparkContext.setLogLevel("ERROR")
    # One file per task, so a pass has many tasks and a fault lands between its first and its last.
    spark.conf.set("spark.sql.files.maxPartitionBytes", "1024")
    spark.conf.set("spark.sql.files.openCostInBytes", "1")
    tracker = spark.sparkContext.statusTracker()
    for index in range(args.passes):
        started = time.monotonic()
        spark.sparkContext.setJobGroup(f"prepare-{index}", "list the tree")
        images = read_images_with_rejections(spark, args.data).images
        table = ImageFeaturizer(featureLayer=args.layer, imageSize=args.image_size, batchSize=4).transform(images)
        group = f"pass-{index}"
        spark.sparkContext.setJobGroup(group, args.job_description.format(index=index))
        destination = f"{args.out}/pass-{index}"
        table.select("path", vector_to_array("features").alias("features"), "featurize_error").write.mode(
            "overwrite"
        ).parquet(Path(destination).resolve().as_uri())
        failed = sum(
            stage.numFailedTasks
            for job_id in tracker.getJobIdsForGroup(group)
            if (info := tracker.getJobInfo(job_id))
            for stage in map(tracker.getStageInfo, info.stageIds)
            if stage
        )
        print(
            json.dumps(
                {
                    "index": index,
                    "seconds": round(time.monotonic() - started, 2),
                    "failed_tasks": failed,
                    "table": destination,
                }
            ),
            flush=True,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cxr_pipeline.spark.featurize_passes", description=__doc__)
    parser.add_argument("--data", required=True, help="chest_xray tree URI")
    parser.add_argument("--out", required=True, help="local folder for the pass-i tables")
    parser.add_argument("--passes", type=int, required=True)
    parser.add_argument("--ui-port", type=int, required=True, help="driver UI port (its REST API shows progress)")
    parser.add_argument("--layer", required=True, help="the backbone's feature layer")
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument(
        "--job-description", required=True, help='each pass\'s Spark job description, e.g. "featurize pass {index}"'
    )
    add_config_options(parser, verbose=False)
    return parser


COMMAND = Command("featurize_passes", build_parser, featurize_passes, spark_app="cxr-faults-featurize")


def main(argv: list[str] | None = None) -> int:
    return run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
