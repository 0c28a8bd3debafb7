"""No patient data out of a whole DICOM run (issue 15).

A small chest_xray tree of DICOM files made from the 16 sample X-rays, each patient with its own
planted identity (name, birth date, PatientID, institution, referring physician, accession number),
goes through the real entry points as a user runs them: ``jobs/train_featurizer.py`` (patient carve
from the header, MLflow into a store of this test), ``jobs/predict.py`` on DICOM files and
``cxr-predict-image`` on one. Then EVERY byte they wrote is scanned for every planted value in any
case (and the birth date as YYYYMMDD and YYYY-MM-DD): the run folder, the feature cache, the
predictions, the MLflow store (SQLite file and artifacts) and the jobs' captured stdout/stderr.
Parquet pages are compressed, so Parquet files are also read back and their values scanned as text.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from serving_support import job_env

from cxr_pipeline.datasets.dicom_from_images import Identity, gray_pixels, jpeg_dicom, native_dicom

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = "75"  # InceptionV3's smallest input: the scan is about bytes written, not about accuracy


def identity_of(patient: int) -> Identity:
    return Identity(
        name=f"Zqplanted^Xylophonia^Quorvane{patient}",
        birth_date=f"19{patient:02d}0417",
        patient_id=f"MRN-ZQPHI-{patient:04d}",
        institution="Zqplanted Saint Elsewhere Infirmary",
        referring_physician="Drzqplanted^Ambrosine",
        accession_number=f"ACC-ZQPHI-{patient:05d}",
    )


def planted_values(identities) -> list[str]:
    return sorted({v.lower() for identity in identities for v in identity.values()})


def make_tree(sample_tree: Path, root: Path) -> list[Identity]:
    """Every sample X-ray as DICOM (JPEG-wrapped, or 12-bit MONOCHROME1 with a window); one patient per
    file-name patient, plus one planted file without pixel data (a rejection: rejected.csv is scanned too)."""
    from cxr_pipeline.images.layout import patient_id

    jpegs = sorted(sample_tree.rglob("*.jpeg"))
    patients = {p: i + 1 for i, p in enumerate(sorted({patient_id(j.name) for j in jpegs}))}
    for n, jpeg in enumerate(jpegs):
        identity = identity_of(patients[patient_id(jpeg.name)])
        target = root / jpeg.relative_to(sample_tree).with_suffix(".dcm")
        target.parent.mkdir(parents=True, exist_ok=True)
        data = jpeg.read_bytes()
        if n % 2:
            stored = 4080 - gray_pixels(data).astype(np.uint16) * 16
            dicom_bytes = native_dicom(stored, 12, identity=identity, photometric="MONOCHROME1", window=(2040.5, 4081))
        else:
            dicom_bytes = jpeg_dicom(data, identity=identity)
        target.write_bytes(dicom_bytes)
    no_pixels = identity_of(99)
    (root / "train" / "NORMAL" / "no-pixels.dcm").write_bytes(
        without_pixel_data(jpeg_dicom(jpegs[0].read_bytes(), identity=no_pixels))
    )
    return [identity_of(i) for i in patients.values()] + [no_pixels]


def without_pixel_data(data: bytes) -> bytes:
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.PixelData
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def run(args: list[str], log: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    with log.open("w") as out:
        return subprocess.run(
            [sys.executable, *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=900
        )


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory, sample_tree):
    """(folders and files to scan, planted values, the run folder): one training run, one prediction, one CLI call."""
    base = tmp_path_factory.mktemp("phi")
    tree = base / "chest_xray"
    identities = make_tree(sample_tree, tree)
    mlflow_store = base / "mlflow"
    mlflow_store.mkdir()
    env = dict(job_env(), MLFLOW_TRACKING_URI=f"sqlite:///{mlflow_store}/mlflow.db")
    logs = base / "logs"
    logs.mkdir()
    run_folder, predictions = base / "run", base / "predictions"
    trained = run(
        [
            "jobs/train_featurizer.py",
            "--data",
            str(tree),
            "--out",
            str(run_folder),
            "--feature-layer",
            "mixed0",
            "--image-size",
            IMAGE_SIZE,
            "--tuning",
            "none",
            "--validation",
            "carve",
            "--features-cache",
            str(base / "features_cache"),
        ],
        logs / "train_featurizer.log",
        env,
    )
    assert trained.returncode == 0, (logs / "train_featurizer.log").read_text()[-3000:]
    predicted = run(
        [
            "jobs/predict.py",
            "--model",
            str(run_folder),
            "--images",
            str(tree / "test"),
            "--out",
            str(predictions),
            "--csv",
        ],
        logs / "predict.log",
        env,
    )
    assert predicted.returncode == 0, (logs / "predict.log").read_text()[-3000:]
    one = sorted((tree / "test").rglob("*.dcm"))[0]
    cli = run(
        ["-m", "cxr_pipeline.serving.predict_image", "--model", str(run_folder), "--json", str(one)],
        logs / "predict_image.log",
        env,
    )
    assert cli.returncode == 0, (logs / "predict_image.log").read_text()[-3000:]
    scanned = [run_folder, base / "features_cache", predictions, mlflow_store, logs]
    return scanned, planted_values(identities), run_folder, tree


BASE64_RUN = re.compile(r"(?:[A-Za-z0-9+/]|\\n|\n){64,}={0,2}")  # JSON strings hold "\n" line breaks


def base64_decoded(text: str) -> str:
    """Every long base64 run decoded (MLflow writes binary input examples as base64 JSON strings)."""
    decoded = []
    for match in BASE64_RUN.finditer(text):
        run = match.group().replace("\\n", "").replace("\n", "")
        decoded.append(base64.b64decode(run[: len(run) // 4 * 4], validate=False).decode("latin-1"))
    return "\n".join(decoded)


def texts_of(path: Path):
    """The file's bytes as text, its base64 runs decoded, and for Parquet every value read back (pages are
    compressed)."""
    data = path.read_bytes()
    text = data.decode("latin-1")
    yield "bytes", text
    yield "base64", base64_decoded(text)
    if path.suffix == ".parquet" or data[:4] == b"PAR1":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        yield (
            "values",
            "\n".join(
                f"{name}={value!r}"
                for name, column in zip(table.column_names, table.columns)
                for value in column.to_pylist()
            ),
        )
        yield (
            "values",
            json.dumps(
                table.schema.metadata
                and {k.decode("latin-1"): v.decode("latin-1") for k, v in table.schema.metadata.items()}
            ),
        )


def leaks(folders, values) -> tuple[int, list[str]]:
    files, found = 0, []
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            files += 1
            for how, text in texts_of(path):
                lowered = text.lower()
                found += [f"{value!r} in {path} ({how})" for value in values if value in lowered]
    return files, found


@pytest.mark.slow
def test_no_planted_patient_value_in_any_output_of_a_dicom_run(dicom_run):
    folders, values, run_folder, tree = dicom_run
    files, found = leaks(folders, values)
    assert found == [], "patient data leaked:\n" + "\n".join(found[:20])
    # what was scanned is what a DICOM run writes: the run used the header's patients and rejected the bad file
    assert files > 20
    images_csv = (run_folder / "images.csv").read_text()
    assert images_csv.count(".dcm") == 16
    assert "no-pixels.dcm" in (run_folder / "rejected.csv").read_text()
    assert list((tree.parent / "mlflow").rglob("*.db")) and list((tree.parent / "mlflow").rglob("metrics.json"))
    assert list((tree.parent / "features_cache").rglob("*.parquet"))
    assert list((tree.parent / "predictions").rglob("*.parquet"))


@pytest.mark.slow
def test_the_scan_finds_planted_values_where_they_are(dicom_run):
    """The scanner itself can see a leak: in the DICOM inputs, and in compressed Parquet values."""
    folders, values, _, tree = dicom_run
    assert len(leaks([tree / "test"], values)[1]) >= 4
    import pyarrow as pa
    import pyarrow.parquet as pq

    leaked = tree.parent / "leak_probe"
    leaked.mkdir(exist_ok=True)
    pq.write_table(pa.table({"patient": [values[0].upper() * 50]}), leaked / "x.parquet", compression="snappy")
    assert any("(values)" in hit for hit in leaks([leaked], values)[1])
    dicom_file = next((tree / "test").rglob("*.dcm")).read_bytes()
    (leaked / "example.json").write_text(json.dumps({"data": [base64.encodebytes(dicom_file).decode()]}))
    assert any("example.json (base64)" in hit for hit in leaks([leaked], values)[1])


# ---------------------------------------------------------------- the published patient key


@pytest.fixture(scope="module")
def dicom_tree(tmp_path_factory, sample_tree) -> Path:
    tree = tmp_path_factory.mktemp("published_key") / "chest_xray"
    make_tree(sample_tree, tree)
    return tree


SITE_KEY = "dicom.patient_key=a-secret-of-this-test-site"


@pytest.mark.slow
@pytest.mark.parametrize("key", ["published", "site"])
@pytest.mark.parametrize("job", ["spark", "cnn"])
def test_training_on_dicom_with_the_published_patient_key_warns(job, key, dicom_tree, spark, tmp_path, caplog, capfd):
    """conf/defaults.yaml publishes a patient key: a run whose pseudonyms were made with it says so on the console,
    in metrics.json and (Spark job) at the end of summary.txt; a site's own key gives no warning."""
    from cxr_pipeline import config as cfg
    from cxr_pipeline.images.dicom import PUBLISHED_KEY_WARNING

    overrides = ["tracking.enabled=false", *([SITE_KEY] if key == "site" else [])]
    if job == "spark":
        from cxr_pipeline.spark.classifier.training import train

        features = ["featurizer.weights=random", "featurizer.feature_layer=mixed0"]
        features.append(f"featurizer.image_size={IMAGE_SIZE}")
        cache = f"training.features_cache={dicom_tree.parent / 'features_cache'}"
        config = cfg.load_config("local", overrides=[*overrides, *features, cache])
        result = train(spark, config, str(dicom_tree), str(tmp_path / "run"))
        metrics, console = result.metrics, caplog.text
        assert (PUBLISHED_KEY_WARNING in result.summary) == (key == "published")
    else:
        from cxr_pipeline.cnn.train import train_and_evaluate

        cnn = ["cnn.epochs=1", "cnn.batch_size=4", "cnn.image_size=32", "cnn.verbose=0"]
        config = cfg.load_config("local", overrides=[*overrides, *cnn])
        metrics = train_and_evaluate(config, str(dicom_tree), str(tmp_path / "run"))
        console = capfd.readouterr().err
    assert metrics["warnings"] == ([PUBLISHED_KEY_WARNING] if key == "published" else [])
    assert (PUBLISHED_KEY_WARNING in console) == (key == "published")
    assert (PUBLISHED_KEY_WARNING in (tmp_path / "run" / "metrics.json").read_text()) == (key == "published")
