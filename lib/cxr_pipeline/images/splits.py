"""Carving a validation set out of ``train``, grouped by patient.

The Kermany ``val`` folder holds only 16 images, so validation is taken from
``train`` instead. Several images can come from one patient; putting them on
both sides of the split would leak, so whole patients are assigned.

Pure and deterministic: a patient's side depends only on its id, its class, the
seed and the fraction (a salted hash orders the patients of each class), never
on the order the files were listed in.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from .layout import patient_id


@dataclass(frozen=True)
class SplitSummary:
    train_images: int
    val_images: int
    train_patients: int
    val_patients: int


def _rank(patient: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{patient}".encode()).hexdigest()


def validation_patients(
    file_names: Sequence[str],
    labels: Sequence[int],
    fraction: float,
    seed: int,
) -> set[str]:
    """The patient ids that go to validation.

    Stratified by class: within each class, patients are taken in salted-hash
    order until about ``fraction`` of that class's images are in validation. Every
    class with at least two patients gets at least one validation patient, and
    at least one patient always stays in training.
    """
    if len(file_names) != len(labels):
        raise ValueError("file_names and labels must have the same length")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return set()

    images_per_patient: dict[str, int] = defaultdict(int)
    patient_label: dict[str, int] = {}
    for name, label in zip(file_names, labels):
        pid = patient_id(name)
        images_per_patient[pid] += 1
        # A patient with images in both classes is grouped under its smallest label,
        # so it is still assigned as a whole.
        patient_label[pid] = min(int(label), patient_label.get(pid, int(label)))

    by_class: dict[int, list[str]] = defaultdict(list)
    for pid, label in patient_label.items():
        by_class[label].append(pid)

    chosen: set[str] = set()
    for patients in by_class.values():
        if len(patients) < 2:
            continue
        patients.sort(key=lambda p: _rank(p, seed))
        target = fraction * sum(images_per_patient[p] for p in patients)
        taken = 0
        for pid in patients[:-1]:  # keep at least one patient for training
            if taken > 0 and taken + images_per_patient[pid] / 2 > target:
                break
            chosen.add(pid)
            taken += images_per_patient[pid]
            if taken >= target:
                break
    return chosen


def is_validation(
    file_names: Sequence[str],
    labels: Sequence[int],
    fraction: float,
    seed: int,
) -> list[bool]:
    """For each image, whether it goes to validation (same order as the input); ``fraction`` and ``seed`` are
    ``training.validation_fraction`` and ``training.seed``."""
    chosen = validation_patients(file_names, labels, fraction, seed)
    return [patient_id(name) in chosen for name in file_names]


CARVE_POOL = ("train", "val")  # folders pooled before the validation carve (Kermany's val/ has only 16 images)


def carve_pool(folder_splits: Sequence[str]) -> list[bool]:
    """Whether each image (by its folder split) joins the pool that ``carve`` splits into train/val.

    The one rule shared by the Spark job and the CNN: the ``train`` and ``val``
    folders are pooled, ``test`` stays apart for the final report.
    """
    return [s in CARVE_POOL for s in folder_splits]


def summarize(file_names: Sequence[str], flags: Sequence[bool]) -> SplitSummary:
    train_p = {patient_id(n) for n, v in zip(file_names, flags) if not v}
    val_p = {patient_id(n) for n, v in zip(file_names, flags) if v}
    n_val = sum(1 for v in flags if v)
    return SplitSummary(
        train_images=len(flags) - n_val,
        val_images=n_val,
        train_patients=len(train_p),
        val_patients=len(val_p),
    )
