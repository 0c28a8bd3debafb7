"""The 16 real Kermany chest X-rays as a small ``chest_xray`` tree (``make sample-data``).

PyPI ``pneumonia-model-package==0.3.0`` ships exactly the Kermany ``chest_xray/val``
folder: 8 NORMAL (``NORMAL2-IM-14xx-0001.jpeg``) and 8 PNEUMONIA
(``person19xx_bacteria_*.jpeg``) images. They are re-laid out here as
``<out>/{train,val,test}/{NORMAL,PNEUMONIA}/`` so that every split has both
classes, keeping all images of one patient in the same split.

Caveat for anyone reading metrics on this tree: it is 16 images, and NORMAL files
are 170-530 kB while PNEUMONIA ones are 49-120 kB, so file size alone separates
the classes.

    python -m cxr_pipeline.datasets.sample --out data/sample/chest_xray
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

from cxr_pipeline import paths
from cxr_pipeline.cli import Command, Job, add_config_options, run
from cxr_pipeline.images.layout import patient_id
from cxr_pipeline.infra import registry_assets

# Per class: 8 images -> 4 train, 2 val, 2 test.
SPLIT_COUNTS = {"train": 4, "val": 2, "test": 2}
STAMP_NAME = ".complete"


def kermany_class(file_name: str) -> str:
    """NORMAL / PNEUMONIA from a Kermany file name (the wheel keeps them in one flat folder)."""
    lower = file_name.lower()
    if lower.startswith(("normal", "im-")):
        return "NORMAL"
    if lower.startswith("person") and ("_bacteria_" in lower or "_virus_" in lower):
        return "PNEUMONIA"
    raise ValueError(f"{file_name}: cannot tell NORMAL from PNEUMONIA by its name")


def split_by_patient(file_names: Iterable[str], counts: Mapping[str, int] = SPLIT_COUNTS) -> dict[str, str]:
    """file name -> split, whole patients per split, each split filled towards its count.

    Deterministic: the biggest patients are placed first (ties by id), each into
    the split that is furthest below its target (ties in ``counts`` order).
    """
    patients: dict[str, list[str]] = defaultdict(list)
    for name in sorted(file_names):
        patients[patient_id(name)].append(name)
    filled = {split: 0 for split in counts}
    assignment = {}
    for _patient, names in sorted(patients.items(), key=lambda item: (-len(item[1]), item[0])):
        split = max(counts, key=lambda s: (counts[s] - filled[s], -list(counts).index(s)))
        filled[split] += len(names)
        assignment.update({name: split for name in names})
    return assignment


def plan_tree(file_names: Iterable[str], counts: Mapping[str, int] = SPLIT_COUNTS) -> dict[str, str]:
    """file name -> ``split/CLASS/file`` for the sample tree."""
    by_class: dict[str, list[str]] = defaultdict(list)
    for name in file_names:
        by_class[kermany_class(name)].append(name)
    plan = {}
    for label, names in sorted(by_class.items()):
        for name, split in split_by_patient(names, counts).items():
            plan[name] = f"{split}/{label}/{name}"
    return plan


def _tree_matches(out: Path, expected: Mapping[str, bytes]) -> bool:
    actual = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    if actual != set(expected):
        return False
    return all((out / rel).stat().st_size == len(data) for rel, data in expected.items())


def build_sample_tree(out: Path, stamp: Path | None = None) -> dict[str, str]:
    """Write the tree (replacing a different one at ``out``); a no-op when it is already there."""
    out = Path(out)
    images = registry_assets.wheel_val_images()
    plan = plan_tree(images)
    expected = {plan[name]: data for name, data in images.items()}
    if out.is_dir() and _tree_matches(out, expected):
        print(f"sample tree already complete at {out}", file=sys.stderr)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Build next to the target and swap it in, so an interrupted run never
        # leaves a half tree that looks complete.
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        for rel, data in expected.items():
            (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
            (scratch / rel).write_bytes(data)
        if out.exists():
            shutil.rmtree(out)
        os.replace(scratch, out)
        print(f"wrote {len(expected)} images to {out}", file=sys.stderr)
    (out.parent / "SOURCE.txt").write_text(
        f"{out.name}/: the 16 images of the Kermany chest_xray/val folder, taken from PyPI "
        f"{registry_assets.PNEUMONIA_MODEL_PACKAGE.spec} ({registry_assets.WHEEL_VAL_IMAGES_DIR}),\n"
        f"re-split per class into train/val/test {SPLIT_COUNTS} keeping patients together.\n"
        "Original data: Kermany et al., Cell 2018, doi:10.17632/rscbjbr9sj.2 (CC BY 4.0).\n"
    )
    if stamp is not None:
        stamp.touch()
    return plan


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cxr_pipeline.datasets.sample", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=paths.SAMPLE_TREE, help="tree root (default: %(default)s)")
    parser.add_argument(
        "--stamp", type=Path, default=None, help="stamp file touched when done (default: <out>/../.complete)"
    )
    add_config_options(parser, spark=False, verbose=False)
    return parser


def _build(job: Job) -> int:
    build_sample_tree(job.args.out, job.args.stamp or job.args.out.parent / STAMP_NAME)
    return 0


COMMAND = Command("sample", build_parser, _build, errors=lambda: (registry_assets.AssetError, ValueError))


def main(argv=None) -> int:
    return run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
