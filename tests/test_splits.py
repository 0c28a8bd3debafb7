"""Patient-grouped carve of validation from train (pure, no Spark)."""

import random

import pytest

from cxr_pipeline.images.layout import patient_id
from cxr_pipeline.images.splits import is_validation, summarize, validation_patients


def kermany_like(n_patients=60, seed=0):
    """Kermany-style names: pneumonia patients with 1-4 images, normal ones with 1-2."""
    rng = random.Random(seed)
    names, labels = [], []
    for p in range(n_patients):
        if p % 3 == 0:
            for i in range(rng.randint(1, 2)):
                prefix = "NORMAL2-IM" if p % 2 else "IM"
                names.append(f"{prefix}-{p:04d}-{i + 1:04d}.jpeg")
                labels.append(0)
        else:
            for _ in range(rng.randint(1, 4)):
                kind = "bacteria" if p % 2 else "virus"
                names.append(f"person{p}_{kind}_{rng.randint(1, 9999)}.jpeg")
                labels.append(1)
    return names, labels


def test_no_patient_on_both_sides():
    names, labels = kermany_like()
    flags = is_validation(names, labels, fraction=0.25, seed=7)
    val_patients = {patient_id(n) for n, f in zip(names, flags) if f}
    train_patients = {patient_id(n) for n, f in zip(names, flags) if not f}
    assert val_patients and train_patients
    assert not (val_patients & train_patients)


def test_fraction_is_roughly_respected_per_class():
    names, labels = kermany_like(n_patients=300)
    flags = is_validation(names, labels, fraction=0.2, seed=1)
    for cls in (0, 1):
        n = sum(1 for y in labels if y == cls)
        n_val = sum(1 for y, f in zip(labels, flags) if y == cls and f)
        assert 0.12 * n <= n_val <= 0.28 * n, (cls, n, n_val)


def test_deterministic_and_order_independent():
    names, labels = kermany_like()
    a = validation_patients(names, labels, 0.2, seed=3)
    pairs = list(zip(names, labels))
    random.Random(5).shuffle(pairs)
    b = validation_patients([n for n, _ in pairs], [y for _, y in pairs], 0.2, seed=3)
    assert a == b
    assert a != validation_patients(names, labels, 0.2, seed=4)


def test_tiny_sets_keep_both_sides_per_class():
    # the 16-image sample: 4 train images per class, one image per patient
    names = [f"NORMAL2-IM-14{i}-0001.jpeg" for i in range(4)] + [f"person19{i}_bacteria_1.jpeg" for i in range(4)]
    labels = [0] * 4 + [1] * 4
    flags = is_validation(names, labels, fraction=0.2, seed=42)
    for cls in (0, 1):
        side = [f for y, f in zip(labels, flags) if y == cls]
        assert any(side) and not all(side)
    s = summarize(names, flags)
    assert s.train_images + s.val_images == 8


def test_single_patient_class_stays_in_training_and_zero_fraction():
    names = ["person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg", "IM-0001-0001.jpeg", "IM-0002-0001.jpeg"]
    labels = [1, 1, 0, 0]
    flags = is_validation(names, labels, 0.5, seed=0)
    assert flags[:2] == [False, False]
    assert sum(flags[2:]) == 1
    assert is_validation(names, labels, 0.0, seed=0) == [False] * 4
    with pytest.raises(ValueError):
        is_validation(names, labels, 1.0, seed=0)


def test_carve_pool_is_train_and_val_folders():
    from cxr_pipeline.images.splits import carve_pool

    assert carve_pool(["train", "val", "test", "train"]) == [True, True, False, True]
