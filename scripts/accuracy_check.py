#!/usr/bin/env python
"""The accuracy protocol in one command (a script, not a test): docs/accuracy.md says what it measures.

    PYTHONPATH=lib .venv/bin/python scripts/accuracy_check.py --data ../shared/data/kermany_chest_xray_224_train.tar
    PYTHONPATH=lib .venv/bin/python scripts/accuracy_check.py --data /path/to/chest_xray          # a tree
    PYTHONPATH=lib .venv/bin/python scripts/accuracy_check.py --data ../shared/data/pneumoniamnist_28_trainval.npz

1. lays ``--data`` out as a chest_xray tree: a tree is used as it is, a tar is unpacked, the PneumoniaMNIST npz is
   written out as JPEGs (its ``val`` split becomes ``test/``). A tree without ``test/`` gets one: a patient-grouped,
   class-stratified ``--holdout`` of ``train/`` (seed ``--holdout-seed``, not the jobs' own carve seed). Such a
   held-out split comes from the same collection as ``train/``: its figures are not figures on unseen data;
2. loads the tree into the local HDFS (scripts/hdfs_load.py, resumable);
3. runs the jobs with the README's settings, each on ``train/`` with its own patient-grouped validation carve:
   ``cnn`` (jobs/train_cnn.py, InceptionV3 fine-tuned), ``spark`` (jobs/train_featurizer.py on ImageNet features)
   and ``spark-cnn`` (jobs/train_featurizer.py --backbone-run on the cnn run's fine-tuned backbone);
4. prints, for each job, accuracy at 0.5 and at the job's own threshold, AUC, sensitivity and specificity on
   ``test/`` with 95 % bootstrap intervals, and writes them to ``<out>/accuracy.json``.

Jobs whose run folder is already complete are not run again (``--rerun`` does).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

JOBS = ("cnn", "spark", "spark-cnn")
# The fine-tuning recipe of the two-step flow (docs/accuracy.md says how it was chosen).
CNN_ARGS = [
    *("--model", "inception_v3", "--image-size", "224", "--feature-layer", "mixed5"),
    *("--epochs", "2", "--fine-tune-epochs", "8", "--set", "cnn.fine_tune.blocks=3"),
    *("--cache", "memory", "--verbose", "2"),
]


def prepare_tree(data: Path, work: Path, holdout: float, seed: int) -> Path:
    """``work/chest_xray`` with train/ and test/ folders (see the module docstring)."""
    tree = work / "chest_xray"
    if (tree / "train").is_dir() and (tree / "test").is_dir():
        return tree
    staging = work / "chest_xray.staging"
    shutil.rmtree(staging, ignore_errors=True)
    if data.suffix == ".npz":
        from cxr_pipeline.datasets import medmnist

        medmnist.convert(data, staging, size=0, splits=("train", "val"))
        (staging / "val").rename(staging / "test")
    else:
        source = _unpacked(data, work) if data.is_file() else data
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns(".*"))
    if not (staging / "test").is_dir():
        carve_test(staging, holdout, seed)
    shutil.rmtree(tree, ignore_errors=True)
    staging.rename(tree)
    return tree


def _unpacked(tar: Path, work: Path) -> Path:
    target = work / "unpacked"
    if not target.is_dir():
        with tarfile.open(tar) as archive:
            archive.extractall(work / "unpacked.staging", filter="data")
        (work / "unpacked.staging").rename(target)
    found = [p for p in target.rglob("train") if p.is_dir()]
    if not found:
        raise SystemExit(f"{tar}: no train/ folder inside (expected chest_xray/train/NORMAL|PNEUMONIA/*.jpeg)")
    return found[0].parent


def carve_test(tree: Path, fraction: float, seed: int) -> None:
    """Move a patient-grouped, class-stratified ``fraction`` of train/ into test/ (the jobs' own carve rule)."""
    from cxr_pipeline.images import splits

    files = sorted(p for p in (tree / "train").glob("*/*") if p.is_file())
    labels = [0 if p.parent.name == "NORMAL" else 1 for p in files]
    for path, held in zip(files, splits.is_validation([p.name for p in files], labels, fraction, seed)):
        if held:
            target = tree / "test" / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)


def environment() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'lib'}:{os.environ.get('PYTHONPATH', '')}",
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
    }


def run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=environment(), cwd=REPO)


def job_commands(args, data_uri: str, runs: str) -> dict[str, list[str]]:
    spark_submit = [str(REPO / "scripts" / "spark-submit"), "--master", args.master, "--driver-memory", "3g"]
    featurizer = [*spark_submit, str(REPO / "jobs" / "train_featurizer.py"), "--data", data_uri, "--overwrite"]
    extra = [f"--set={s}" for s in args.set]
    return {
        "cnn": [
            sys.executable,
            str(REPO / "jobs" / "train_cnn.py"),
            "--data",
            data_uri,
            "--out",
            f"{runs}/cnn",
            "--overwrite",
            *CNN_ARGS,
            *args.cnn_args,
            *extra,
        ],
        "spark": [*featurizer, "--out", f"{runs}/spark", *extra],
        "spark-cnn": [*featurizer, "--out", f"{runs}/spark-cnn", "--backbone-run", f"{runs}/cnn", *extra],
    }


def figures(metrics: dict) -> dict:
    """Test figures with intervals from a run's metrics.json (the Spark and the CNN job name them differently)."""
    test = metrics["test"]
    intervals = test["intervals"]
    at_half = intervals.get("at_default_0.5") or intervals["at_0.5"]
    chosen = intervals.get("at_chosen") or intervals["at_threshold"]
    return {"n": test.get("n") or sum(metrics["counts"]["test"].values()), "at_0.5": at_half, "at_chosen": chosen}


def report(results: dict[str, dict], out: Path) -> None:
    from cxr_pipeline.evaluation import metrics as M

    print(f"\n{'job':10s} {'threshold':>9s} " + " ".join(f"{k:>22s}" for k in M.INTERVAL_METRICS))
    for job, result in results.items():
        for key in ("at_0.5", "at_chosen"):
            b = result[key]
            print(
                f"{job:10s} {b['threshold']:9.3f} "
                + " ".join(f"{M.fmt_interval(b[k]):>22s}" for k in M.INTERVAL_METRICS)
            )
    out.write_text(json.dumps(results, indent=1, default=float))
    print(f"\nwritten: {out}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", type=Path, required=True, help="a chest_xray tree, its .tar, or the PneumoniaMNIST .npz"
    )
    parser.add_argument("--work", type=Path, default=REPO / "data" / "accuracy", help="local tree and report folder")
    parser.add_argument("--hdfs-root", default="hdfs://127.0.0.1:9000/accuracy", help="where the tree and runs go")
    parser.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    parser.add_argument("--holdout", type=float, default=0.2, help="held-out share of train/ when there is no test/")
    parser.add_argument("--holdout-seed", type=int, default=2018)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--cnn-args", nargs=argparse.REMAINDER, default=[], help="extra train_cnn.py options (last)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for all jobs")
    parser.add_argument("--rerun", action="store_true", help="run jobs whose run folder is already complete")
    args = parser.parse_args(argv)

    from cxr_pipeline.infra import run_folder, storage
    from cxr_pipeline.infra.localstack.hdfs_cluster import ensure_running

    name = hashlib.sha256(str(args.data.resolve()).encode()).hexdigest()[:8]
    work = args.work / f"{args.data.stem}-{name}"
    work.mkdir(parents=True, exist_ok=True)
    tree = prepare_tree(args.data, work, args.holdout, args.holdout_seed)
    ensure_running()
    data_uri = f"{args.hdfs_root.rstrip('/')}/{work.name}/chest_xray"
    runs = f"{args.hdfs_root.rstrip('/')}/{work.name}/runs"
    run([sys.executable, str(REPO / "scripts" / "hdfs_load.py"), str(tree), data_uri])
    commands = job_commands(args, data_uri, runs)
    results = {}
    for job in JOBS:
        if job not in args.jobs:
            continue
        out = f"{runs}/{job}"
        if args.rerun or not run_folder.is_complete(out):
            started = time.time()
            run(commands[job])
            print(f"[accuracy] {job}: {(time.time() - started) / 60:.1f} min", flush=True)
        results[job] = figures(json.loads(storage.read_bytes(f"{out}/metrics.json")))
    report(results, work / "accuracy.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
