#!/usr/bin/env python
"""Choosing the Spark job's feature settings by cross-validation inside the training data (a script, not a test).

    # 1. pooled features of several layers in one forward pass, through the job's own decode path
    #    (imaging.decode_image with data.intensity), for every image of train/ in a tree, its .tar or the npz:
    python scripts/accuracy_check_levers.py featurize --data ../shared/data/kermany_chest_xray_224_train.tar \\
        --model InceptionV3 --layers mixed4 mixed5 mixed7 --out data/levers/inception_299.npz
    python scripts/accuracy_check_levers.py featurize --data ... --weights RUN_CNN/backbone.weights.h5 \\
        --image-size 224 --layers mixed5 --out data/levers/finetuned.npz
    # 2. patient-grouped 5-fold CV of the Spark pipeline's classifier (StandardScaler + class-weighted L2 logistic
    #    regression, its objective in numpy), each fold's threshold chosen on the job's own 20 % carve; and the
    #    shift check: leave one acquisition batch of NORMAL images out (file names IM-* / NORMAL2-IM-*)
    python scripts/accuracy_check_levers.py cv data/levers/inception_299.npz --sets mixed5 mixed4+mixed5 --regs 0.1 1

Every figure is printed with its 95 % bootstrap interval. docs/accuracy.md says what the protocol can and cannot
tell: folds inside one collection predict an unseen collection poorly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's solves are small: threads only contend with Spark's
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from cxr_pipeline.evaluation import metrics as M  # noqa: E402

FOLDS = 5
FOLD_SEED = 42
CARVE_FRACTION = 0.2  # the jobs' own validation carve (training.validation_fraction)


# ------------------------------------------------------------------ featurize


def train_images(data: Path, work: Path) -> list[tuple[str, int, Path]]:
    """(file name, label, path) of every image in the tree's train/ folder (a tar or npz is laid out first)."""
    from accuracy_check import prepare_tree

    tree = prepare_tree(data, work, holdout=0.0, seed=0) if not (data / "train").is_dir() else data
    rows = []
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        rows += [(p.name, label, p) for p in sorted((tree / "train" / name).glob("*")) if not p.name.startswith(".")]
    return rows


def featurize(args) -> int:
    import keras

    from cxr_pipeline.images import decode as imaging
    from cxr_pipeline.models import backbones

    rows = train_images(args.data, args.work)
    size = backbones.resolve_image_size(args.model, args.image_size)
    base = backbones.build_backbone(args.model, args.weights, args.layers[-1], pooling=None, image_size=size)
    pooled = [keras.layers.GlobalAveragePooling2D()(base.get_layer(layer).output) for layer in args.layers]
    model = keras.Model(base.inputs, pooled)
    features = {layer: [] for layer in args.layers}
    started = time.time()
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start : start + args.batch_size]
        pixels = np.stack([imaging.decode_image(p.read_bytes(), size, intensity=args.intensity) for _, _, p in chunk])
        outputs = model.predict_on_batch(backbones.preprocess(args.model, pixels))
        for layer, values in zip(args.layers, outputs if len(args.layers) > 1 else [outputs]):
            features[layer].append(np.asarray(values, np.float32))
        if start % (50 * args.batch_size) == 0:
            print(f"{start + len(chunk)}/{len(rows)} images, {time.time() - started:.0f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        args.out,
        names=np.array([n for n, _, _ in rows]),
        labels=np.array([label for _, label, _ in rows]),
        **{layer: np.concatenate(v) for layer, v in features.items()},
    )
    print(f"wrote {args.out}: {len(rows)} images x {args.layers} in {time.time() - started:.0f} s")
    return 0


# ------------------------------------------------------------------ numpy logistic regression (Spark's objective)


def standardize(train: np.ndarray, *others: np.ndarray):
    mean, std = train.mean(0), train.std(0, ddof=1)
    std[std == 0] = 1.0
    return [(a - mean) / std for a in (train, *others)]


def fit_lr(x: np.ndarray, y: np.ndarray, reg: float, iters: int = 25) -> np.ndarray:
    """Newton's method on the class-weighted mean log-loss + reg/2 ||beta||^2, intercept unpenalized (Spark's LR).
    With more features than images the Newton step is solved in image space (Woodbury identity)."""
    cw = M.inverse_frequency_weights(M.class_counts(y))
    w = np.where(y == 1, cw[1], cw[0])
    w = w / w.sum()
    xa = np.hstack([x, np.ones((len(x), 1))])
    n, d = xa.shape
    penalty = np.full(d, float(reg))
    penalty[-1] = 1e-8 * max(float(reg), 1e-12)
    beta = np.zeros(d)
    kernel = (xa / penalty) @ xa.T if d > n else None
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(xa @ beta, -30, 30)))
        grad = xa.T @ (w * (p - y)) + penalty * beta
        dw = w * p * (1 - p)
        if kernel is None:
            step = np.linalg.solve((xa * dw[:, None]).T @ xa + np.diag(penalty), grad)
        else:
            root = np.sqrt(dw)
            g_scaled = grad / penalty
            inner = np.eye(n) + root[:, None] * kernel * root[None, :]
            step = g_scaled - (xa.T @ (root * np.linalg.solve(inner, root * (xa @ g_scaled)))) / penalty
        beta -= step
        if np.abs(step[:-1]).max() < 1e-5 * max(1.0, np.abs(beta[:-1]).max()):
            break
    return beta


def predict_lr(beta: np.ndarray, x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x @ beta[:-1] + beta[-1], -30, 30)))


# ------------------------------------------------------------------ cross-validation


def normal_batch(name: str) -> str | None:
    """The acquisition batch of a Kermany NORMAL file name (NORMAL2-IM-* or IM-*), None for anything else."""
    return "NORMAL2" if name.startswith("NORMAL2-") else "IM" if name.startswith("IM-") else None


def rule_args(rule: str) -> dict:
    """``choose_threshold_by_rule`` arguments: ``rule`` with the other threshold settings of conf/."""
    from cxr_pipeline import config

    return M.rule_args_from_config({**config.load_config("local")["training"], "threshold_rule": rule})


def fit_and_score(x, y, names, train, test, reg: float, rule: str) -> tuple[np.ndarray, float]:
    """Fit on ``train`` minus the job's patient-grouped carve; the carve picks the threshold; score ``test``."""
    from cxr_pipeline.images import splits

    carve = np.asarray(splits.is_validation(list(names[train]), list(y[train]), CARVE_FRACTION, FOLD_SEED))
    fit, val = train[~carve], train[carve]
    x_fit, x_val, x_test = standardize(x[fit], x[val], x[test])
    beta = fit_lr(x_fit, y[fit], reg)
    threshold = M.choose_threshold_by_rule(y[val], predict_lr(beta, x_val), **rule_args(rule)).threshold
    return predict_lr(beta, x_test), threshold


def summarize(y: np.ndarray, scores: np.ndarray, thresholds: np.ndarray) -> dict:
    out = {"auc": M.roc_auc(y, scores)}
    for tag, t in (("0.5", np.full(len(y), 0.5)), ("rule", thresholds)):
        pred = (scores >= t).astype(int)
        out[f"acc@{tag}"] = float(np.mean(pred == y))
        out[f"sens@{tag}"] = float(np.mean(pred[y == 1] == 1))
        out[f"spec@{tag}"] = float(np.mean(pred[y == 0] == 0))
    return out


def cv_candidate(data, layers: list[str], reg: float, rule: str) -> dict:
    from cxr_pipeline.images.layout import patient_id

    names, y = data["names"], data["labels"]
    x = np.hstack([data[layer] for layer in layers]).astype(np.float64)
    fold = np.array(
        [int(hashlib.sha256(f"{FOLD_SEED}:{patient_id(n)}".encode()).hexdigest(), 16) % FOLDS for n in names]
    )
    scores, thresholds = np.zeros(len(y)), np.zeros(len(y))
    for k in range(FOLDS):
        train, test = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        scores[test], thresholds[test] = fit_and_score(x, y, names, train, test, reg, rule)
    result = {"cv": summarize(y, scores, thresholds)}
    result["cv"]["auc_ci"] = M.metrics_with_intervals(y, scores, 0.5, M.BOOTSTRAP_RESAMPLES, M.BOOTSTRAP_SEED)["auc"]
    batches = np.array([normal_batch(n) if label == 0 else None for n, label in zip(names, y)])
    for held in sorted({b for b in batches if b}):
        # NORMAL images of one batch never seen in training, against the pneumonia patients of fold 0
        test = np.flatnonzero((batches == held) | ((y == 1) & (fold == 0)))
        train = np.setdiff1d(np.flatnonzero((batches != held) | (y == 1)), test)
        s, t = fit_and_score(x, y, names, train, test, reg, rule)
        result[f"without {held}"] = summarize(y[test], s, np.full(len(test), t))
    return result


def cv(args) -> int:
    results = []
    for path in args.features:
        data = dict(np.load(path))
        for spec in args.sets:
            for reg in args.regs:
                started = time.time()
                row = {"features": Path(path).stem, "set": spec, "reg": reg, "rule": args.rule}
                row.update(cv_candidate(data, spec.split("+"), reg, args.rule))
                results.append(row)
                print(json.dumps(row, default=lambda v: round(float(v), 4)), f"({time.time() - started:.0f} s)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=float))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("featurize", help="pooled features of train/ images")
    f.add_argument("--data", type=Path, required=True, help="a chest_xray tree, its .tar, or PneumoniaMNIST's .npz")
    f.add_argument("--work", type=Path, default=REPO / "data" / "levers", help="where a tar or npz is laid out")
    f.add_argument("--model", default="InceptionV3")
    f.add_argument("--weights", default=None, help="a .weights.h5 file (default: the provisioned one)")
    f.add_argument("--layers", nargs="+", default=["mixed4", "mixed5", "mixed7"])
    f.add_argument("--image-size", type=int, default=None, help="default: the backbone's own")
    f.add_argument("--intensity", default="equalize", help="data.intensity (imaging.normalize_intensity)")
    f.add_argument("--batch-size", type=int, default=16)
    f.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("cv", help="grouped CV and the leave-one-batch-out check")
    c.add_argument("features", nargs="+", help=".npz files written by featurize")
    c.add_argument("--sets", nargs="+", default=["mixed5"], help="layers, several joined by + (concatenated)")
    c.add_argument("--regs", nargs="+", type=float, default=[0.1])
    c.add_argument("--rule", default="youden", help="training.threshold_rule for the per-fold threshold")
    c.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    return {"featurize": featurize, "cv": cv}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
