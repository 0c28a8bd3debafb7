"""Development data sets: the real 16-image sample tree, MedMNIST conversion, synthetic images."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_pipeline.datasets import medmnist, sample, synthetic
from cxr_pipeline.images.layout import SPLITS, parse_image_path, patient_id

SHARED_NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist_28_trainval.npz"


def _tree(root: Path, pattern: str = "*.jpeg") -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob(pattern))}


def _digest(root: Path) -> dict[str, str]:
    return {rel: hashlib.sha256(p.read_bytes()).hexdigest() for rel, p in _tree(root).items()}


# ------------------------------------------------------------ sample tree


def test_kermany_class_from_file_name():
    assert sample.kermany_class("NORMAL2-IM-1427-0001.jpeg") == "NORMAL"
    assert sample.kermany_class("IM-0117-0001.jpeg") == "NORMAL"
    assert sample.kermany_class("person1946_bacteria_4874.jpeg") == "PNEUMONIA"
    assert sample.kermany_class("person3_virus_15.jpeg") == "PNEUMONIA"
    with pytest.raises(ValueError, match="cannot tell"):
        sample.kermany_class("scan_001.jpeg")


def test_split_by_patient_keeps_patients_together_and_fills_targets():
    names = [
        "person1_bacteria_1.jpeg",
        "person1_bacteria_2.jpeg",
        "person1_virus_3.jpeg",
        "person2_bacteria_4.jpeg",
        "person3_bacteria_5.jpeg",
        "person4_virus_6.jpeg",
        "person5_bacteria_7.jpeg",
    ]
    assignment = sample.split_by_patient(names, {"train": 4, "val": 2, "test": 1})
    assert {assignment[n] for n in names[:3]} == {"train"}
    assert Counter(assignment.values()) == {"train": 4, "val": 2, "test": 1}
    assert sample.split_by_patient(reversed(names), {"train": 4, "val": 2, "test": 1}) == assignment


@pytest.fixture(scope="module")
def built_sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample") / "chest_xray"
    sample.build_sample_tree(root, stamp=root.parent / ".complete")
    return root


def _check_sample_layout(root: Path) -> None:
    files = _tree(root)
    assert len(files) == 16
    parsed = [parse_image_path(str(p)) for p in files.values()]
    per_split = Counter((p.split, p.label_name) for p in parsed)
    assert per_split == {(s, c): n for s, n in sample.SPLIT_COUNTS.items() for c in ("NORMAL", "PNEUMONIA")}
    for p in parsed:
        assert sample.kermany_class(p.file_name) == p.label_name
    splits_of_patient: dict[str, set] = {}
    for p in parsed:
        splits_of_patient.setdefault(patient_id(p.file_name), set()).add(p.split)
    assert all(len(s) == 1 for s in splits_of_patient.values())
    assert len(splits_of_patient) == 15  # person1946 has two images


def test_sample_tree_layout(built_sample):
    _check_sample_layout(built_sample)
    assert (built_sample.parent / ".complete").exists()
    with Image.open(next(iter(_tree(built_sample).values()))) as image:
        assert image.format == "JPEG" and min(image.size) >= 500


def test_sample_tree_is_idempotent_and_repairs_itself(built_sample):
    before = {rel: p.stat().st_mtime_ns for rel, p in _tree(built_sample).items()}
    sample.build_sample_tree(built_sample)
    assert {rel: p.stat().st_mtime_ns for rel, p in _tree(built_sample).items()} == before
    victim = next(iter(_tree(built_sample).values()))
    victim.unlink()
    (built_sample / "train" / "NORMAL" / "stray.jpeg").write_bytes(b"x")
    sample.build_sample_tree(built_sample)
    assert set(_tree(built_sample)) == set(before)


def test_repository_sample_tree_matches_the_builder(sample_tree, built_sample):
    assert _digest(sample_tree) == _digest(built_sample)


# ------------------------------------------------------------ MedMNIST


@pytest.fixture
def tiny_npz(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "tiny.npz"
    np.savez(
        path,
        train_images=rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        train_labels=np.array([[1], [1], [1], [1], [0], [0]], dtype=np.uint8),
        val_images=rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        val_labels=np.array([[0], [1], [0]], dtype=np.uint8),
    )
    return path


def test_medmnist_labels_to_folders_and_sizes(tiny_npz, tmp_path):
    out = tmp_path / "tree"
    counts = medmnist.convert(tiny_npz, out, size=64, splits=["train", "val"])
    assert counts == {"train": Counter(PNEUMONIA=4, NORMAL=2), "val": Counter(NORMAL=2, PNEUMONIA=1)}
    files = _tree(out)
    assert "train/PNEUMONIA/pmnist_train_000000.jpeg" in files
    assert "train/NORMAL/pmnist_train_000005.jpeg" in files
    assert "val/PNEUMONIA/pmnist_val_000001.jpeg" in files
    assert len(files) == 9
    with Image.open(files["val/NORMAL/pmnist_val_000002.jpeg"]) as image:
        assert image.size == (64, 64) and image.mode == "L"
    assert (out / medmnist.README_NAME).exists()


def test_medmnist_native_size_keeps_pixels_close(tiny_npz, tmp_path):
    medmnist.convert(tiny_npz, tmp_path / "tree", size=0, splits=["val"])
    images, _ = medmnist.load_split(tiny_npz, "val")
    with Image.open(tmp_path / "tree/val/NORMAL/pmnist_val_000000.jpeg") as image:
        decoded = np.asarray(image, dtype=float)
    assert decoded.shape == (28, 28)
    assert np.abs(decoded - images[0]).mean() < 12  # JPEG q95 of noise: close, not exact


def test_medmnist_limit_takes_both_classes(tiny_npz, tmp_path):
    counts = medmnist.convert(tiny_npz, tmp_path / "tree", size=32, splits=["train"], limit=3)
    assert counts["train"] == Counter(NORMAL=1, PNEUMONIA=2)
    assert medmnist.limited_rows(np.array([1, 1, 1, 1, 0, 0]), 5).tolist() == [0, 1, 2, 4, 5]


def test_medmnist_rejects_bad_input(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.array([0, 2]))
    with pytest.raises(ValueError, match=r"0 \(normal\) or 1 \(pneumonia\), found \[2\]"):
        medmnist.load_split(bad, "train")
    with pytest.raises(ValueError, match="no test_images"):
        medmnist.load_split(bad, "test")


@pytest.mark.skipif(not SHARED_NPZ.exists(), reason="the shared PneumoniaMNIST copy is not on this machine")
def test_medmnist_real_pneumoniamnist_subset(tmp_path):
    out = tmp_path / "pmnist"
    assert (
        medmnist.main(["--npz", str(SHARED_NPZ), "--out", str(out), "--size", "96", "--limit", "4", "--workers", "1"])
        == 0
    )
    files = _tree(out)
    assert len(files) == 8
    assert Counter(parse_image_path(str(p)).label_name for p in files.values()) == {"NORMAL": 4, "PNEUMONIA": 4}


# ------------------------------------------------------------ synthetic


def test_synthetic_plan_spreads_splits_and_classes():
    rows = synthetic.plan(20)
    assert Counter(split for _, split, _ in rows) == {"train": 16, "val": 2, "test": 2}
    assert Counter(label for _, _, label in rows) == {0: 10, 1: 10}
    assert [i for i, _, _ in rows] == list(range(20))
    assert {split for _, split, _ in synthetic.plan(5, ["test"])} == {"test"}


def test_synthetic_layout_and_readme(tmp_path):
    counts = synthetic.generate(tmp_path / "syn", n=10, width=80, height=64, seed=3)
    files = _tree(tmp_path / "syn")
    assert len(files) == 10 and sum(sum(c.values()) for c in counts.values()) == 10
    assert all(Path(rel).name.startswith("synthetic_") for rel in files)
    assert {parse_image_path(str(p)).split for p in files.values()} == set(SPLITS)
    assert "SYNTHETIC" in (tmp_path / "syn" / synthetic.README_NAME).read_text()
    with Image.open(files["train/NORMAL/synthetic_train_000000.jpeg"]) as image:
        assert image.size == (80, 64) and image.mode == "L"


def test_synthetic_is_deterministic_across_workers_and_seeds(tmp_path):
    synthetic.generate(tmp_path / "a", n=12, width=64, height=48, seed=7, workers=1)
    synthetic.generate(tmp_path / "b", n=12, width=64, height=48, seed=7, workers=2)
    synthetic.generate(tmp_path / "c", n=12, width=64, height=48, seed=8, workers=1)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a").keys() == _digest(tmp_path / "c").keys()
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_synthetic_cli_rejects_bad_size(tmp_path, capsys):
    assert synthetic.main(["--out", str(tmp_path), "--n", "2", "--size", "big"]) == 2  # a usage error, as argparse
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
