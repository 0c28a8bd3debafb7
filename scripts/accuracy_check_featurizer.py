"""Accuracy check of the Spark featurizer pipeline on PneumoniaMNIST (a script, not a test).

1. converts ``pneumoniamnist_28_trainval.npz`` into a chest_xray tree: the npz
   ``train`` split becomes ``train/`` (the job carves validation from it) and the
   npz ``val`` split becomes ``test/``, the held-out set of this check;
2. loads the tree into the local HDFS (scripts/hdfs_load.py, resumable);
3. runs ``spark-submit jobs/train_featurizer.py`` on it;
4. prints accuracy, AUC, sensitivity and specificity next to the MedMNIST v2
   reference (ResNet-18 at 28 px: ACC 0.854, AUC 0.944; Yang et al. 2023).

    python scripts/accuracy_check_featurizer.py --npz ../shared/data/pneumoniamnist_28_trainval.npz
    python scripts/accuracy_check_featurizer.py --npz ... --limit 600     # a quick subset

The npz now holds 4,707 train images (1,213 NORMAL) and 524 val. Featurizing ~4,400 images through
InceptionV3 (to mixed5, the default layer) took 33 min on 2 busy cores (about 25 min of it featurizing);
a re-run reuses the feature cache. Each figure is printed with its 95 % bootstrap interval.
Choosing settings: scripts/accuracy_check_levers.py (cross-validation inside npz train).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

REFERENCE = {"name": "MedMNIST v2 ResNet-18 (28)", "accuracy": 0.854, "auc": 0.944}


def convert_tree(npz: Path, out: Path, size: int, limit: int | None) -> None:
    from cxr_pipeline.datasets import medmnist

    if (out / "test").is_dir() and (out / "train").is_dir():
        print(f"tree already at {out}", flush=True)
        return
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    medmnist.convert(npz, staging, size=size, splits=("train", "val"), limit=limit, workers=2)
    (staging / "val").rename(staging / "test")  # npz val = held-out test of this check
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--npz", type=Path, default=REPO.parent / "shared" / "data" / "pneumoniamnist_28_trainval.npz")
    parser.add_argument(
        "--size", type=int, default=128, help="side of the converted JPEGs (the featurizer resizes anyway)"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="at most N images per split (class-balanced); default all"
    )
    parser.add_argument("--work", type=Path, default=REPO / "data" / "pmnist_check", help="local tree folder")
    parser.add_argument("--hdfs", default="hdfs://127.0.0.1:9000/data/pmnist_check/chest_xray")
    parser.add_argument("--out", default="hdfs://127.0.0.1:9000/runs/accuracy_featurizer")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("job_args", nargs="*", help="extra arguments for train_featurizer.py (after --)")
    args = parser.parse_args(argv)

    suffix = f"_limit{args.limit}" if args.limit else ""
    tree = args.work / f"chest_xray{suffix}"
    hdfs_tree = args.hdfs.rstrip("/") + suffix
    out = args.out.rstrip("/") + suffix
    started = time.time()
    convert_tree(args.npz, tree, args.size, args.limit)
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'lib'}:{os.environ.get('PYTHONPATH', '')}",
        "SPARK_LOCAL_IP": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1"),
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
    }
    from cxr_pipeline.localstack.hdfs_cluster import ensure_running

    ensure_running()
    subprocess.run([sys.executable, str(REPO / "scripts" / "hdfs_load.py"), str(tree), hdfs_tree], check=True, env=env)
    spark_submit = str(Path(sys.executable).parent / "spark-submit")
    job = [
        spark_submit,
        "--master",
        args.master,
        "--driver-memory",
        "3g",
        str(REPO / "jobs" / "train_featurizer.py"),
        "--data",
        hdfs_tree,
        "--out",
        out,
        *args.job_args,
    ]  # the default pipeline (conf/defaults.yaml)
    print("+", " ".join(job), flush=True)
    t_job = time.time()
    subprocess.run(job, check=True, env=env)
    job_seconds = time.time() - t_job

    from cxr_pipeline import storage

    m = json.loads(storage.read_bytes(out + "/metrics.json"))
    t = m["test"]
    print("\n=== PneumoniaMNIST accuracy check (held-out = npz val split) ===")
    cache = m["featurizer"].get("cache") or {}
    print(
        f"images: {json.dumps(m['counts'])}; feature cache: {cache.get('reused_rows')} rows reused, "
        f"{cache.get('featurized_rows')} featurized"
    )
    print(f"job wall time {job_seconds:.0f} s (total {time.time() - started:.0f} s)")
    print(f"threshold rule: {m['threshold'].get('description')}")
    from cxr_pipeline import metrics as M

    for key, label in (
        ("at_default_0.5", "threshold 0.5"),
        ("at_chosen", f"validation-chosen {t['at_chosen']['threshold']:.3f}"),
    ):
        b = t["intervals"][key]
        print(f"{label:28s} " + "  ".join(f"{k} {M.fmt_interval(b[k])}" for k in M.INTERVAL_METRICS))
    print(f"Brier {M.fmt(t.get('brier'))}; model card: {out}/model_card.md")
    print(f"{REFERENCE['name']:28s} accuracy {REFERENCE['accuracy']:.3f}  auc {REFERENCE['auc']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
