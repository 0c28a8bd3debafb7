"""Accuracy levers of the Spark pipeline, measured with a protocol that cannot fool you (a script, not a test).

The npz ``train`` split is the development data; the npz ``val`` split is the
untouched held-out test, looked at once per candidate (``holdout``), never in a loop.

    # 1. features once, through the job's own decode path (npz 28 px -> 128 px JPEG as
    #    accuracy_check_featurizer.py writes it -> imaging.decode_image at 299 px -> InceptionV3):
    #    average / generalized-mean (p=3) / max pooling of mixed3, mixed4 and mixed5 in one forward pass
    python scripts/accuracy_check_levers.py featurize --subset 1200 --out data/levers/none_1200.npz
    # 2. patient-grouped 5-fold CV inside npz train: a numpy weighted logistic regression
    #    (StandardScaler + L2, the Spark objective) over feature sets x regParam x threshold rules;
    #    in each fold the thresholds come from the job's own patient-grouped 20 % carve
    python scripts/accuracy_check_levers.py cv data/levers/none_1200.npz --regs 0.01 0.1 1
    # 3. one look at the held-out split per chosen candidate, with 95 % bootstrap intervals
    python scripts/accuracy_check_levers.py holdout data/levers/none_1200.npz --set mixed5_avg --reg 0.01
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # a shared 2-core machine: threads only thrash
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from cxr_pipeline import metrics as M  # noqa: E402

LAYERS = ("mixed3", "mixed4", "mixed5")
POOLINGS = ("avg", "gem", "max")
GEM_P = 3.0


# ------------------------------------------------------------------ featurize


def job_pixels(image28: np.ndarray, size: tuple[int, int], tree_px: int = 128, intensity: str = "none") -> np.ndarray:
    """The pixels the job sees: the tree's JPEG (medmnist.convert) decoded by imaging.decode_image."""
    from cxr_pipeline import imaging
    from cxr_pipeline.datasets import medmnist, tree_writer

    jpeg = tree_writer.encode_gray_jpeg(medmnist.to_pixels(image28, tree_px), 95)
    return imaging.decode_image(jpeg, size, intensity=intensity)


def pooled_model(image_size: int):
    """InceptionV3 (provisioned weights) -> {layer}_{avg|gem|max} for LAYERS, one forward pass."""
    import keras
    from keras import ops

    from cxr_pipeline import backbones

    # the provisioned weights' graph; its own (flattened) output is unused, each layer is pooled three ways below
    base = backbones.build_backbone("InceptionV3", feature_layer="mixed5", pooling=None, image_size=image_size)
    outputs = {}
    for layer in LAYERS:
        fmap = base.get_layer(layer).output
        outputs[f"{layer}_avg"] = keras.layers.GlobalAveragePooling2D()(fmap)
        outputs[f"{layer}_max"] = keras.layers.GlobalMaxPooling2D()(fmap)
        outputs[f"{layer}_gem"] = keras.layers.Lambda(
            lambda x: ops.power(ops.mean(ops.power(ops.maximum(x, 1e-6), GEM_P), axis=(1, 2)), 1.0 / GEM_P)
        )(fmap)
    return keras.Model(base.inputs, outputs)


def featurize(args) -> int:
    from cxr_pipeline import backbones
    from cxr_pipeline.datasets import medmnist

    size = (args.image_size, args.image_size)
    model = pooled_model(args.image_size)
    out = {}
    started = time.time()
    for split in ("train", "val"):
        images, labels = medmnist.load_split(args.npz, split)
        rows = medmnist.limited_rows(labels, args.limit)
        if args.subset and split == "train" and args.subset < len(rows):  # random rows, natural class ratio
            rows = np.sort(np.random.default_rng(0).choice(rows, args.subset, replace=False))
        feats: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(rows), args.batch_size):
            chunk = rows[start : start + args.batch_size]
            batch = np.stack([job_pixels(images[i], size, intensity=args.intensity) for i in chunk])
            x = backbones.preprocess("InceptionV3", batch)
            if args.flip_tta:
                x = x[:, :, ::-1, :]
            for key, value in model.predict_on_batch(x).items():
                feats.setdefault(key, []).append(np.asarray(value, dtype=np.float32))
            if start % (args.batch_size * 20) == 0:
                print(f"{split} {start}/{len(rows)} {time.time() - started:.0f} s", flush=True)
        for key, parts in feats.items():
            out[f"{split}/{key}"] = np.concatenate(parts)
        out[f"{split}/labels"] = labels[rows].astype(np.int64)
        out[f"{split}/rows"] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} in {time.time() - started:.0f} s", flush=True)
    return 0


# ------------------------------------------------------------------ numpy logistic regression (Spark objective)


def standardize(train: np.ndarray, *others: np.ndarray):
    mean, std = train.mean(0), train.std(0, ddof=1)
    std[std == 0] = 1.0
    return [(a - mean) / std for a in (train, *others)]


def fit_lr(x: np.ndarray, y: np.ndarray, reg: float, weighted: bool = True, iters: int = 25) -> np.ndarray:
    """Newton's method on mean weighted log-loss + reg/2 ||beta||^2 (intercept unpenalized), like Spark's LR.

    With more features than images the Newton step is solved in image space (Woodbury identity),
    so concatenated layers (2,304 features) cost no more than one layer.
    """
    w = np.ones(len(y))
    if weighted:
        cw = M.inverse_frequency_weights(M.class_counts(y))
        w = np.where(y == 1, cw[1], cw[0])
    w = w / w.sum()
    xa = np.hstack([x, np.ones((len(x), 1))])
    n, d = xa.shape
    penalty = np.full(d, float(reg))
    penalty[-1] = 1e-8 * max(float(reg), 1e-12)  # the intercept: (almost) unpenalized
    beta = np.zeros(d)
    kernel = (xa / penalty) @ xa.T if d > n else None  # X Lambda^-1 X^T, fixed across iterations
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


def patient_folds(n_rows: np.ndarray, split: str, k: int, seed: int = 42) -> np.ndarray:
    """Fold of each image by salted hash of its patient (PneumoniaMNIST: one image per file name)."""
    import hashlib

    from cxr_pipeline.dataset_layout import patient_id
    from cxr_pipeline.datasets.medmnist import file_name

    fold = []
    for row in n_rows:
        pid = patient_id(file_name(split, int(row)))
        fold.append(int(hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest(), 16) % k)
    return np.asarray(fold)


def feature_set(data, split: str, names: list[str]) -> np.ndarray:
    return np.hstack([data[f"{split}/{n}"] for n in names])


def rule_thresholds(y_val, s_val, rules) -> dict[str, float]:
    out = {}
    for name, rule in rules.items():
        out[name] = M.choose_threshold_by_rule(y_val, s_val, **rule).threshold
    return out


RULES = {
    "sens95": {"rule": "sensitivity", "target_sensitivity": 0.95},
    "youden": {"rule": "youden"},
    "cost1": {"rule": "cost", "cost_fn": 1.0, "cost_fp": 1.0},
    "fixed0.5": {"rule": "fixed", "fixed": 0.5},
}


def cv_candidate(data, names, reg, k=5):
    """Out-of-fold test scores of k patient-grouped folds inside npz train. In each fold, as in the job:
    a patient-grouped 20 % validation carve of the training part chooses the thresholds, the rest trains."""
    from cxr_pipeline import splits
    from cxr_pipeline.datasets.medmnist import file_name

    x_all = feature_set(data, "train", names)
    y = data["train/labels"]
    rows = data["train/rows"]
    folds = patient_folds(rows, "train", k)
    scores = np.zeros(len(y))
    thresholds = {r: np.zeros(len(y)) for r in RULES}
    for f in range(k):
        tr, te = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
        carve = np.asarray(splits.is_validation([file_name("train", int(r)) for r in rows[tr]], list(y[tr]), 0.2, 42))
        fit_idx, val_idx = tr[~carve], tr[carve]
        x_fit, x_val, x_te = standardize(x_all[fit_idx], x_all[val_idx], x_all[te])
        beta = fit_lr(x_fit, y[fit_idx], reg)
        scores[te] = predict_lr(beta, x_te)
        for r, t in rule_thresholds(y[val_idx], predict_lr(beta, x_val), RULES).items():
            thresholds[r][te] = t
    return y, scores, thresholds


def cv(args) -> int:
    results = []
    for path in args.features:
        data = dict(np.load(path))
        tag = Path(path).stem
        for names in [s.split("+") for s in args.sets]:
            for reg in args.regs:
                t0 = time.time()
                y, s, thr = cv_candidate(data, names, reg, k=args.folds)
                row = {
                    "features": tag,
                    "set": "+".join(names),
                    "reg": reg,
                    "auc": M.roc_auc(y, s),
                    "brier": float(np.mean((s - y) ** 2)),
                }
                for r, t in thr.items():
                    pred = (s >= t).astype(int)
                    row[f"acc_{r}"] = float(np.mean(pred == y))
                    row[f"spec_{r}"] = float(np.mean(pred[y == 0] == 0))
                    row[f"sens_{r}"] = float(np.mean(pred[y == 1] == 1))
                results.append(row)
                print(
                    json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}),
                    f"({time.time() - t0:.0f} s)",
                    flush=True,
                )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


def holdout(args) -> int:
    """Fit on npz train minus the job's patient-grouped carve; threshold on the carve; score npz val once."""
    from cxr_pipeline import splits
    from cxr_pipeline.datasets.medmnist import file_name

    data = dict(np.load(args.features_file))
    names = args.set.split("+")
    x, y = feature_set(data, "train", names), data["train/labels"]
    files = [file_name("train", int(r)) for r in data["train/rows"]]
    is_val = np.asarray(splits.is_validation(files, list(y), 0.2, 42))
    xtr, xval, xtest = standardize(x[~is_val], x[is_val], feature_set(data, "val", names))
    beta = fit_lr(xtr, y[~is_val], args.reg)
    s_val, s_test = predict_lr(beta, xval), predict_lr(beta, xtest)
    y_test = data["val/labels"]
    out = {"features": Path(args.features_file).stem, "set": args.set, "reg": args.reg, "n_test": int(len(y_test))}
    for rule, spec in RULES.items():
        choice = M.choose_threshold_by_rule(y[is_val], s_val, **spec)
        out[rule] = M.metrics_with_intervals(y_test, s_test, choice.threshold, n_boot=1000, seed=0)
    print(f"held-out npz val (n={len(y_test)}): {out['features']} {args.set} reg {args.reg}")
    for rule in RULES:
        b = out[rule]
        print(
            f"  {rule:9s} t={b['threshold']:.3f}  "
            + "  ".join(f"{k} {M.fmt_interval(b[k])}" for k in M.INTERVAL_METRICS)
            + f"  brier {b['brier']:.4f}",
            flush=True,
        )
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("featurize")
    f.add_argument("--npz", type=Path, default=REPO.parent / "shared" / "data" / "pneumoniamnist_28_trainval.npz")
    f.add_argument("--image-size", type=int, default=299)
    f.add_argument("--batch-size", type=int, default=16)
    f.add_argument("--limit", type=int, default=None)
    f.add_argument("--subset", type=int, default=None, help="featurize only N random npz train rows (val: all)")
    f.add_argument("--flip-tta", action="store_true", help="featurize the mirrored images (for TTA)")
    f.add_argument("--intensity", default="none", help="imaging.decode_image's intensity normalization")
    f.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("cv")
    c.add_argument("features", nargs="+")
    c.add_argument(
        "--sets",
        nargs="+",
        default=[
            "mixed5_avg",
            "mixed5_gem",
            "mixed4_avg+mixed5_avg",
            "mixed3_avg+mixed4_avg+mixed5_avg",
            "mixed5_avg+mixed5_max",
        ],
    )
    c.add_argument("--regs", nargs="+", type=float, default=[0.01, 0.1, 1.0])
    c.add_argument("--folds", type=int, default=5)
    c.add_argument("--out", default=None)
    h = sub.add_parser("holdout")
    h.add_argument("features_file")
    h.add_argument("--set", default="mixed5_avg")
    h.add_argument("--reg", type=float, default=0.01)
    h.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    return {"featurize": featurize, "cv": cv, "holdout": holdout}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
