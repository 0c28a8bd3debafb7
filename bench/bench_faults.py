"""Fault-injection figures: each kill next to an undisturbed run of the same job, measured in one run.

On a private stack (HDFS with 2 DataNodes and replication 2, a standalone master + 2 one-core
workers, all on free ports; the shared 9000/7077 instances are never touched):

- featurization (ImageFeaturizer over the tree, one task per image), one driver, six passes: warm-up,
  undisturbed, busiest Python worker SIGKILLed, undisturbed, DataNode 1 stopped, undisturbed (the
  baseline is the median of the three undisturbed passes);
- hdfs-load (WebHDFS, as `make hdfs-load` uploads a small tree): undisturbed, then DataNode 1 stopped
  after a few files (storage asks the NameNode for another DataNode when the stopped one refuses), then
  (only if that load failed) the same load again with both DataNodes up;
- the training job (jobs/train_featurizer.py under spark-submit): undisturbed, then one worker JVM
  SIGKILLed while it featurizes.

Rows lost: featurization = reference rows missing, duplicated or with other vectors (tests/tolerances
bounds); hdfs-load = files whose MD5 in HDFS differs from the source; training = images counted in the
run's splits. Time lost = faulted run - undisturbed run.

    PYTHONPATH=lib nice -n 10 .venv/bin/python bench/bench_faults.py [--tree data/sample/chest_xray]
        [--skip-featurization] [--skip-training]    # both: the hdfs-load rows only (~1 min)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cxr_pipeline import paths
from cxr_pipeline.infra import storage
from cxr_pipeline.infra.localstack import faults

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from tolerances import FEATURE_ATOL, FEATURE_RTOL  # noqa: E402


def table_rows_lost(got: dict, reference: dict) -> int:
    """Reference rows missing from ``got``, plus duplicates, plus rows whose vector moved beyond tolerance."""
    duplicates = len(got["paths"]) - len(set(got["paths"]))
    lost = 0
    for path, vector in reference["features"].items():
        other = got["features"].get(path)
        if other is None or not np.allclose(other, vector, rtol=FEATURE_RTOL, atol=FEATURE_ATOL):
            lost += 1
    return lost + duplicates


def training_rows(run_dir: Path) -> int:
    counts = json.loads((run_dir / "metrics.json").read_text())["counts"]
    return sum(n for split in counts.values() for n in split.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=paths.SAMPLE_TREE, help="chest_xray tree (default: %(default)s)")
    parser.add_argument("--layer", default="mixed0", help="InceptionV3 feature layer (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=75, help="square input side (default: %(default)s)")
    parser.add_argument("--skip-training", action="store_true", help="leave out the two training-job runs")
    parser.add_argument("--skip-featurization", action="store_true", help="leave out the six featurization passes")
    args = parser.parse_args(argv)
    if not (args.tree / "train").is_dir():
        print(f"no chest_xray tree at {args.tree}: run `make sample-data` or pass --tree", file=sys.stderr)
        return 1

    rows: list[tuple[str, str, bool, int, float, float]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        root = Path(tmp)
        stack = faults.FaultStack(root / "stack").up()
        try:
            data = f"{stack.hdfs.namenode_uri}/data/chest_xray"
            storage.upload_dir(str(args.tree), data)
            n_images = len(list(args.tree.rglob("*.jpeg")))
            print(
                f"stack up: {stack.hdfs.namenode_uri} (2 DataNodes), {stack.master_url} (2 workers); "
                f"{n_images} images; {args.layer} at {args.image_size}px",
                flush=True,
            )

            if not args.skip_featurization:
                run = faults.run_featurize_passes(
                    stack,
                    data,
                    root / "features",
                    passes=6,
                    faults={2: stack.kill_python_worker, 4: stack.stop_datanode},
                    layer=args.layer,
                    image_size=args.image_size,
                    until_a_task_fails={2},
                )
                stack.hdfs.up()
                if run.returncode != 0:
                    print(run.log[-4000:], file=sys.stderr)
                done = {p["index"]: p for p in run.passes}
                reference = faults.read_feature_table(done[1]["table"]) if 1 in done else {"features": {}}
                undisturbed = [done[i]["seconds"] for i in (1, 3, 5) if i in done]
                baseline = statistics.median(undisturbed) if undisturbed else float("nan")
                print(
                    f"featurization passes (s): {[p['seconds'] for p in run.passes]} "
                    f"(pass 0 warms the workers; undisturbed: 1, 3, 5)",
                    flush=True,
                )
                for index, fault in ((2, "featurize: SIGKILL a Python worker"), (4, "featurize: stop DataNode 1")):
                    faulted = done.get(index)
                    lost = (
                        table_rows_lost(faults.read_feature_table(faulted["table"]), reference)
                        if faulted
                        else len(reference["features"])
                    )
                    rows.append(
                        (
                            fault,
                            run.injected.get(index, "-"),
                            faulted is not None,
                            lost,
                            faulted["seconds"] if faulted else float("nan"),
                            baseline,
                        )
                    )

            plain = faults.run_hdfs_load(stack, args.tree, f"{stack.hdfs.namenode_uri}/loads/plain")
            target = f"{stack.hdfs.namenode_uri}/loads/faulted"
            faulted_load = faults.run_hdfs_load(stack, args.tree, target, stop_datanode_after=4)
            stack.hdfs.up()
            if faulted_load.error:
                print(f"hdfs-load with a stopped DataNode failed: {faulted_load.error}", file=sys.stderr)
            rows.append(
                (
                    "hdfs-load: stop DataNode 1",
                    faulted_load.injected or "-",
                    faulted_load.ok,
                    len(faults.checksum_mismatches(args.tree, target)),
                    faulted_load.seconds,
                    plain.seconds,
                )
            )
            if not faulted_load.ok:
                again = faults.run_hdfs_load(stack, args.tree, target)
                rows.append(
                    (
                        "hdfs-load: the same load re-run",
                        "-",
                        again.ok,
                        len(faults.checksum_mismatches(args.tree, target)),
                        faulted_load.seconds + again.seconds,
                        plain.seconds,
                    )
                )

            if not args.skip_training:
                train_plain = faults.run_training(
                    stack, data, root / "plain" / "run", kill_worker=False, layer=args.layer, image_size=args.image_size
                )
                train_killed = faults.run_training(
                    stack, data, root / "killed" / "run", kill_worker=True, layer=args.layer, image_size=args.image_size
                )
                for name, result in (("undisturbed", train_plain), ("worker killed", train_killed)):
                    if result.returncode != 0:
                        print(f"training ({name}) failed:\n{result.stderr[-3000:]}", file=sys.stderr)
                expected = training_rows(root / "plain" / "run") if train_plain.returncode == 0 else 0
                got = training_rows(root / "killed" / "run") if train_killed.returncode == 0 else 0
                rows.append(
                    (
                        "train job: SIGKILL a worker JVM",
                        train_killed.injected or "-",
                        train_killed.returncode == 0,
                        expected - got,
                        train_killed.seconds,
                        train_plain.seconds,
                    )
                )
        finally:
            stack.down()

    injected = [r for r in rows if r[1] != "-"]
    print(
        f"\n{len(injected)} faults injected, {sum(r[2] for r in injected)} of those jobs completed, "
        f"{sum(r[3] for r in rows if r[2])} rows lost in completed jobs; "
        f"bench took {time.monotonic() - started:.0f} s\n"
    )
    print("| fault | job completed | rows lost | seconds | undisturbed | time lost |")
    print("|---|---|---|---|---|---|")
    for fault, _, completed, lost, seconds, baseline in rows:
        print(
            f"| {fault} | {'yes' if completed else 'NO'} | {lost} | {seconds:.1f} | {baseline:.1f} | "
            f"{seconds - baseline:+.1f} s |"
        )
    print("\ninjected: " + "; ".join(f"{r[0]}: {r[1]}" for r in rows))
    return 0 if all(r[2] and r[3] == 0 for r in injected) else 1


if __name__ == "__main__":
    sys.exit(main())
