"""Classify one or more chest X-ray files on this computer (no Spark, no cluster).

    .venv/bin/cxr-predict-image --model hdfs://127.0.0.1:9000/runs/demo scan1.jpeg scan2.png study.dcm
    .venv/bin/cxr-predict-image --model models:/cxr-pneumonia-spark@champion scan.jpeg --json

--model is a run folder of jobs/train_featurizer.py (classifier.json), a run folder
of jobs/train_cnn.py (cnn.json), a saved .keras CNN (local paths or hdfs:// URIs), or a
registered model models:/NAME@ALIAS. Images: JPEG, PNG (8 or 16-bit), TIFF, BMP, GIF, WebP
or DICOM (.dcm), decoded as the training jobs decode them (DICOM: its window and LUTs,
MONOCHROME1 inverted).
Prints one line per image: class, P(PNEUMONIA) and the threshold used. Exit status
1 when some file could not be read or decoded (it is reported, the others are still
classified).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..cli import Command, Job, UsageError, add_config_options, run
from ..evaluation.metrics import decisions


def is_cnn_model(model: str) -> bool:
    if model.endswith(".keras"):
        return True
    from ..infra import storage

    return storage.exists(model.rstrip("/") + "/cnn.json")


def load_classifier(model: str):
    """A classifier with ``predict_bytes(list[bytes], threshold=None)`` for a Spark run or a CNN."""
    if is_cnn_model(model):
        from ..cnn.predict import LocalCnnClassifier  # lazy: only CNN users need it

        return LocalCnnClassifier.load(model)
    from ..spark.classifier.model_export import LocalClassifier

    return LocalClassifier.load(model)


def read_inputs(files: Sequence[str]) -> tuple[list[bytes | None], dict[int, str]]:
    from ..infra import storage

    contents: list[bytes | None] = []
    errors: dict[int, str] = {}
    for i, name in enumerate(files):
        try:
            contents.append(storage.read_bytes(name) if "://" in name else Path(name).read_bytes())
        except OSError as exc:
            contents.append(None)
            errors[i] = f"cannot read file ({exc.strerror or type(exc).__name__})"
    return contents, errors


def classify(model: str, files: Sequence[str], threshold: float | None = None) -> list[dict[str, Any]]:
    classifier = load_classifier(model)
    contents, read_errors = read_inputs(files)
    readable = [i for i in range(len(files)) if i not in read_errors]
    kwargs = {"threshold": threshold} if threshold is not None else {}
    scored = classifier.predict_bytes([contents[i] for i in readable], **kwargs) if readable else []
    results = decisions(len(files), [], list(read_errors.items()), threshold, [])
    for i, res in zip(readable, scored):
        results[i] = dict(res)
    for name, res in zip(files, results):
        res["file"] = name
    return results


def format_line(res: dict[str, Any]) -> str:
    if res.get("error"):
        return f"{res['file']}: unreadable ({res['error']})"
    return (
        f"{res['file']}: {res['label_name']}  P(PNEUMONIA)={res['probability']:.4f}  threshold={res['threshold']:.4f}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-predict-image", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        required=True,
        help="run folder (Spark or CNN), a .keras file, or a registered "
        "model models:/NAME@ALIAS or models:/NAME/VERSION (MLflow, tracking.* in conf/)",
    )
    parser.add_argument(
        "images", nargs="+", help="image file(s): JPEG, PNG, TIFF, BMP, GIF, WebP or DICOM; local or hdfs://"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="decision threshold on P(PNEUMONIA) (default: the model's validation-chosen one)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    add_config_options(parser, spark=False, verbose=False)
    return parser


def predict_image(job: Job) -> int:
    """Exit 1 when some file could not be read or decoded (each is reported; the others are classified)."""
    from .. import tracking
    from ..cli import missing_on_this_machine
    from ..models.tensorflow_runtime import import_tensorflow

    import_tensorflow()  # its start-up notices stay off the console
    args = job.args
    missing = missing_on_this_machine(args.model, job.config)
    if missing:
        raise UsageError(f"--model {missing}")
    model = tracking.resolve_model(args.model, job.config)  # models:/NAME@ALIAS -> that version's run folder
    results = classify(model, args.images, args.threshold)
    for res in results:
        print(json.dumps(res) if args.json else format_line(res))
    return 1 if any(r.get("error") for r in results) else 0


def _known_errors() -> tuple[type[BaseException], ...]:
    from ..models.backbones import BackboneError

    return (ValueError, FileNotFoundError, BackboneError)  # a bad --model, an incomplete run, missing weights


COMMAND = Command("cxr-predict-image", build_parser, predict_image, errors=_known_errors)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
