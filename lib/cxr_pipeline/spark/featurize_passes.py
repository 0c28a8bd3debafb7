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


def featurize_passes(args: argparse.Namespace) -> int:
    from pyspark.ml.functions import vector_to_array

    from ..config import load_config
    from .featurizer import ImageFeaturizer
    from .reader import read_images_with_rejections
    from .session import spark_session

    config = load_config("standalone")
    config["spark"]["conf"] = {
        **config["spark"]["conf"],
        "spark.ui.port": str(args.ui_port),
        "spark.port.maxRetries": "0",
        "spark.ui.showConsoleProgress": "false",
    }
    spark = spark_session(config, app_name="cxr-faults-featurize", master=args.master)
    spark.sparkContext.setLogLevel("ERROR")
    # One file per task, so a pass has many tasks and a fault lands between its first and its last.
    spark.conf.set("spark.sql.files.maxPartitionBytes", "1024")
    spark.conf.set("spark.sql.files.openCostInBytes", "1")
    tracker = spark.sparkContext.statusTracker()
    try:
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
                for job in tracker.getJobIdsForGroup(group)
                if (info := tracker.getJobInfo(job))
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
    finally:
        spark.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr_pipeline.spark.featurize_passes", description=__doc__)
    parser.add_argument("--master", required=True)
    parser.add_argument("--data", required=True, help="chest_xray tree URI")
    parser.add_argument("--out", required=True, help="local folder for the pass-i tables")
    parser.add_argument("--passes", type=int, required=True)
    parser.add_argument("--ui-port", type=int, required=True, help="driver UI port (its REST API shows progress)")
    parser.add_argument("--layer", required=True, help="the backbone's feature layer")
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument(
        "--job-description", required=True, help='each pass\'s Spark job description, e.g. "featurize pass {index}"'
    )
    return featurize_passes(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
