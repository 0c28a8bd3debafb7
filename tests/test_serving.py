"""The prediction service against REAL trained runs (Spark export and CNN) and real images.

The runs are trained once per session by the project's own jobs on the sample
tree (see serving_support), which takes minutes on 2 cores: the module is slow.
"""
from __future__ import annotations

import base64
import io
import subprocess
import sys

import pytest

import serving_support as support

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory):
    return support.runs_base(tmp_path_factory)


@pytest.fixture(scope="session")
def spark_run(runs_dir, sample_tree):
    return support.spark_run(runs_dir, sample_tree)


@pytest.fixture(scope="session")
def cnn_run(runs_dir, sample_tree):
    return support.cnn_run(runs_dir, sample_tree)


@pytest.fixture(scope="module")
def lr_backend(spark_run):
    from cxr_pipeline.serving import load_backend

    return load_backend(spark_run)


@pytest.fixture(scope="module")
def lr_client(lr_backend):
    from fastapi.testclient import TestClient

    from cxr_pipeline.serving import create_app

    with TestClient(create_app(backend=lr_backend)) as client:
        yield client


@pytest.fixture(scope="module")
def cnn_client(cnn_run):
    from fastapi.testclient import TestClient

    from cxr_pipeline.serving import create_app

    with TestClient(create_app(cnn_run)) as client:
        yield client


@pytest.fixture(scope="session")
def images(sample_tree):
    paths = support.sample_images(sample_tree)
    assert len(paths) >= 4
    return paths


def upload(data: bytes, name: str = "xray.jpeg", mime: str = "image/jpeg"):
    return {"file": (name, data, mime)}


# ----------------------------------------------------------------------------
# The API with the Spark-exported model


def test_health_names_the_loaded_run(lr_client, spark_run):
    response = lr_client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["model"]["kind"] == "spark-lr"
    assert body["model"]["run"] == str(spark_run)
    assert body["model"]["model_id"].startswith("spark_run@")
    assert "mixed0" in body["model"]["name"]


def test_openapi_describes_the_api(lr_client):
    spec = lr_client.get("/openapi.json").json()
    assert set(spec["paths"]) == {"/predict", "/health"}
    predict = spec["paths"]["/predict"]["post"]
    assert "multipart/form-data" in predict["requestBody"]["content"]
    assert {"200", "400", "413", "415", "422"} <= set(predict["responses"])
    fields = spec["components"]["schemas"]["PredictionResponse"]["properties"]
    assert {"class", "probability", "threshold", "model_id"} <= set(fields)


def test_predict_matches_the_exported_classifier(lr_client, spark_run, images):
    from cxr_pipeline.model_export import LocalClassifier

    classifier = LocalClassifier.load(str(spark_run))
    expected = classifier.predict_bytes([p.read_bytes() for p in images])
    seen = set()
    for path, want in zip(images, expected):
        response = lr_client.post("/predict", files=upload(path.read_bytes(), path.name))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["probability"] == pytest.approx(want["probability"], abs=1e-9)
        assert body["label"] == int(body["probability"] >= body["threshold"])
        # One request scored alone differs from a batched call by ~1e-12; the threshold sits
        # halfway between two validation scores, so only a score within 1e-9 of it could flip.
        if abs(want["probability"] - classifier.threshold) > 1e-9:
            assert body["class"] == want["label_name"]
        assert body["threshold"] == pytest.approx(classifier.threshold)
        assert body["model_id"] == lr_client.get("/health").json()["model"]["model_id"]
        seen.add(round(body["probability"], 6))
    assert len(seen) > 1, "every image got the same probability: the model is not being applied"


def test_concurrent_requests_share_model_calls_and_get_their_own_answers(lr_client, lr_backend, images):
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    chosen = images[:8]
    alone = {p.name: lr_client.post("/predict", files=upload(p.read_bytes(), p.name)).json()["probability"]
             for p in chosen}
    barrier = Barrier(len(chosen))

    def send(path):
        barrier.wait()
        return path.name, lr_client.post("/predict", files=upload(path.read_bytes(), path.name)).json()

    with ThreadPoolExecutor(len(chosen)) as pool:
        together = dict(pool.map(send, chosen))
    for name, body in together.items():
        assert body["probability"] == pytest.approx(alone[name], abs=1e-6)
    stats = lr_client.get("/health").json()["batching"]
    assert stats["largest_batch"] > 1
    assert stats["images_scored"] > stats["model_calls"]


def test_service_equals_the_batch_prediction_job(lr_client, spark_run, images, tmp_path):
    """jobs/predict.py (Spark) on the same files gives the service's probabilities to 1e-5."""
    import pandas as pd

    chosen = [images[0], images[-1]]  # a NORMAL and a PNEUMONIA
    folder = tmp_path / "incoming"
    folder.mkdir()
    for path in chosen:
        (folder / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "predictions"
    support.run_job(["jobs/predict.py", "--model", str(spark_run), "--images", str(folder), "--out", str(out)],
                    tmp_path / "predict.log")
    table = pd.read_parquet(out / "predictions.parquet")
    batch = {str(row.path).rsplit("/", 1)[-1]: float(row.probability) for row in table.itertuples()}
    assert set(batch) == {p.name for p in chosen}
    for path in chosen:
        served = lr_client.post("/predict", files=upload(path.read_bytes(), path.name)).json()
        assert served["probability"] == pytest.approx(batch[path.name], abs=1e-5)


BAD_INPUTS = [
    ("empty", lambda good: b"", 400, "empty_upload"),
    ("not an image", lambda good: support.not_an_image(), 415, "not_an_image"),
    ("corrupt JPEG", support.corrupt_jpeg, 422, "corrupt_image"),
    ("truncated JPEG", support.truncated_jpeg, 422, "corrupt_image"),
]


@pytest.mark.parametrize("name, make, status, code", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_a_4xx_json_error(lr_client, lr_backend, images, name, make, status, code):
    from cxr_pipeline.imaging import ImageDecodeError, decode_image

    data = make(images[0].read_bytes())
    response = lr_client.post("/predict", files=upload(data, "upload.jpeg"))
    assert response.status_code == status
    body = response.json()
    assert body["code"] == code
    assert len(body["detail"]) > 20  # a sentence for a person
    # The batch jobs reject the same bytes: same decoder, same verdict.
    with pytest.raises(ImageDecodeError):
        decode_image(data)
    (batch_result,) = lr_backend.classifier.predict_bytes([data])
    assert batch_result["error"] and batch_result["probability"] is None


@pytest.mark.parametrize("name, make, status, code", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_a_clear_message_on_the_page(lr_client, images, name, make, status, code):
    data = make(images[0].read_bytes())
    response = lr_client.post("/", files=upload(data, "upload.jpeg"))
    assert response.status_code == status
    assert "text/html" in response.headers["content-type"]
    assert f'data-code="{code}"' in response.text
    assert 'id="error-message"' in response.text
    assert 'id="result"' not in response.text


def test_missing_file_part_is_a_422_with_a_message(lr_client):
    response = lr_client.post("/predict", data={"something": "else"})
    assert response.status_code == 422
    assert response.json()["code"] == "missing_file"
    bad_flag = lr_client.post("/predict?heatmap=perhaps", files=upload(b"x"))
    assert bad_flag.status_code == 422 and bad_flag.json()["code"] == "invalid_request"
    assert "heatmap" in bad_flag.json()["detail"]


@pytest.fixture(scope="module")
def small_limit_client(lr_backend):
    from fastapi.testclient import TestClient

    from cxr_pipeline.serving import create_app

    with TestClient(create_app(backend=lr_backend, max_upload_mb=0.1)) as client:  # 100 kB
        yield client


def test_over_the_size_limit_is_413_before_decoding(small_limit_client, images):
    big = max(images, key=lambda p: p.stat().st_size)
    assert big.stat().st_size > 0.1 * 1024 * 1024
    response = small_limit_client.post("/predict", files=upload(big.read_bytes(), big.name))
    assert response.status_code == 413
    assert response.json()["code"] == "too_large"
    assert "102 kB" in response.json()["detail"]  # states the limit
    page = small_limit_client.post("/", files=upload(big.read_bytes(), big.name))
    assert page.status_code == 413
    assert 'data-code="too_large"' in page.text
    small = min(images, key=lambda p: p.stat().st_size)
    assert small_limit_client.post("/predict", files=upload(small.read_bytes(), small.name)).status_code == 200


def test_a_chunked_body_is_cut_off_at_the_limit(small_limit_client, images):
    """No Content-Length (chunked transfer): the body is counted as it arrives."""
    big = max(images, key=lambda p: p.stat().st_size).read_bytes()
    boundary = "chunkedboundary42"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jpeg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + big + f"\r\n--{boundary}--\r\n".encode()

    def chunks():
        for start in range(0, len(body), 16384):
            yield body[start:start + 16384]

    response = small_limit_client.post("/predict", content=chunks(),
                                       headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413
    assert response.json()["code"] == "too_large"


# ----------------------------------------------------------------------------
# The page


def test_page_has_the_upload_form_and_the_model(lr_client):
    response = lr_client.get("/")
    assert response.status_code == 200
    html = response.text
    assert 'enctype="multipart/form-data"' in html and 'type="file"' in html
    assert lr_client.get("/health").json()["model"]["model_id"] in html
    assert "http://" not in html and "https://" not in html  # nothing fetched from outside
    assert lr_client.get("/static/style.css").status_code == 200


def test_page_shows_image_class_probability_threshold(lr_client, images):
    path = images[-1]
    api = lr_client.post("/predict", files=upload(path.read_bytes(), path.name)).json()
    response = lr_client.post("/", files=upload(path.read_bytes(), path.name))
    assert response.status_code == 200
    html = response.text
    assert f'<span id="result-class" class="class">{api["class"]}</span>' in html
    assert f'data-value="{api["probability"]}"' in html
    assert f'data-value="{api["threshold"]}"' in html
    assert 'src="data:image/jpeg;base64,' in html
    assert "result-heatmap" not in html  # the Spark model has no Grad-CAM


def test_client_file_name_is_escaped_on_the_page(lr_client, images):
    response = lr_client.post("/", files=upload(b"", '<img src=x onerror="alert(1)">.jpeg'))
    assert response.status_code == 400
    assert "<img src=x" not in response.text
    assert "&lt;img src=x" in response.text


# ----------------------------------------------------------------------------
# Keeping uploads: never under the client's name, only when configured


def test_uploads_are_not_kept_by_default(lr_backend, images, tmp_path):
    from fastapi.testclient import TestClient

    from cxr_pipeline.serving import create_app

    store = tmp_path / "uploads"
    with TestClient(create_app(backend=lr_backend, upload_dir=store)) as client:
        assert client.post("/predict", files=upload(images[0].read_bytes(), "a.jpeg")).status_code == 200
    assert not store.exists() or not any(store.iterdir())


def test_kept_uploads_use_generated_names(lr_backend, images, tmp_path):
    import json

    from fastapi.testclient import TestClient

    from cxr_pipeline.serving import create_app

    store = tmp_path / "kept" / "uploads"
    hostile = "../../../escaped.jpeg"
    with TestClient(create_app(backend=lr_backend, keep_uploads=True, upload_dir=store)) as client:
        ok = client.post("/predict", files=upload(images[0].read_bytes(), hostile))
        bad = client.post("/predict", files=upload(support.not_an_image(), hostile))
    assert ok.status_code == 200 and bad.status_code == 415
    kept = sorted(p.name for p in store.iterdir())
    assert len(kept) == 2  # the accepted image and its prediction; the rejected file is not kept
    image_file = next(store.glob("*.jpeg"))
    assert image_file.read_bytes() == images[0].read_bytes()
    record = json.loads(next(store.glob("*.json")).read_text())
    assert record["probability"] == pytest.approx(ok.json()["probability"])
    assert not list(tmp_path.rglob("escaped*"))
    assert all("escaped" not in name for name in kept)


def test_keep_uploads_without_a_folder_is_refused(lr_backend):
    from cxr_pipeline.serving import create_app

    with pytest.raises(ValueError, match="upload_dir"):
        create_app(backend=lr_backend, keep_uploads=True)


# ----------------------------------------------------------------------------
# The CNN: same interface, plus Grad-CAM


def test_cnn_predict_matches_its_classifier_and_draws_a_heatmap(cnn_client, cnn_run, images):
    from PIL import Image

    from cxr_pipeline.cnn.predict import LocalCnnClassifier

    path = images[0]
    data = path.read_bytes()
    (want,) = LocalCnnClassifier.load(str(cnn_run)).predict_bytes([data])
    response = cnn_client.post("/predict?heatmap=true", files=upload(data, path.name))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["kind"] == "cnn"
    assert body["probability"] == pytest.approx(want["probability"], abs=1e-6)
    assert body["class"] == want["label_name"]
    overlay = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png_base64"])))
    original = Image.open(io.BytesIO(data))
    assert overlay.format == "PNG" and max(overlay.size) <= 640
    assert abs(overlay.width / overlay.height - original.width / original.height) < 0.02
    assert isinstance(body["heatmap_flat"], bool)
    assert cnn_client.post("/predict", files=upload(data, path.name)).json()["heatmap_png_base64"] is None


def test_cnn_page_shows_the_heatmap(cnn_client, images):
    response = cnn_client.post("/", files=upload(images[0].read_bytes(), images[0].name))
    assert response.status_code == 200
    assert 'id="result-heatmap" src="data:image/png;base64,' in response.text
    flat = cnn_client.post("/predict?heatmap=true", files=upload(images[0].read_bytes())).json()["heatmap_flat"]
    assert ('id="heatmap-flat"' in response.text) == flat  # a flat map is said to be flat


def test_cnn_rejects_what_imaging_rejects(cnn_client, images):
    response = cnn_client.post("/predict", files=upload(support.truncated_jpeg(images[0].read_bytes())))
    assert response.status_code == 422 and response.json()["code"] == "corrupt_image"


# ----------------------------------------------------------------------------
# Loading and the command line


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    from cxr_pipeline.serving import ModelLoadError, load_backend

    with pytest.raises(ModelLoadError, match="classifier.json"):
        load_backend(tmp_path)


def test_cli_help_and_bad_model_exit_code(tmp_path):
    env = support.job_env()
    helped = subprocess.run([sys.executable, "-m", "cxr_pipeline.serving", "--help"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--model" in helped.stdout
    refused = subprocess.run([sys.executable, "-m", "cxr_pipeline.serving", "--model", str(tmp_path)], env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "not a run folder" in refused.stderr
