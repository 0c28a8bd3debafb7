"""Pure parts of the prediction service: upload checks, heat-map overlay, settings, exposure checks (no model, fast)."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import serving_support as support
from PIL import Image

from cxr_pipeline.serving.app import format_probability
from cxr_pipeline.serving.backends import overlay_heatmap
from cxr_pipeline.serving.guards import host_name
from cxr_pipeline.serving.settings import ServingSettings
from cxr_pipeline.serving.validation import MIB, UploadRejected, browser_image, check_upload


def jpeg(width=320, height=240, seed=1) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def test_a_good_image_passes_and_is_described():
    checked = check_upload(jpeg(), MIB, size=(64, 64))
    assert (checked.format, checked.width, checked.height) == ("jpeg", 320, 240)


@pytest.mark.parametrize(
    "data, status, code",
    [
        (b"", 400, "empty_upload"),
        (support.not_an_image(), 415, "not_an_image"),
        (support.corrupt_jpeg(jpeg()), 422, "corrupt_image"),
        (support.truncated_jpeg(jpeg()), 422, "corrupt_image"),
    ],
)
def test_bad_uploads_are_rejected_with_status_and_code(data, status, code):
    with pytest.raises(UploadRejected) as caught:
        check_upload(data, MIB, size=(64, 64))
    assert (caught.value.status_code, caught.value.code) == (status, code)
    assert caught.value.as_json() == {"detail": caught.value.message, "code": code}


def test_size_limit_and_pixel_guard():
    data = jpeg()
    with pytest.raises(UploadRejected) as caught:
        check_upload(data, len(data) - 1, size=(64, 64))
    assert caught.value.status_code == 413
    with pytest.raises(UploadRejected) as caught:
        check_upload(data, MIB, size=(64, 64), max_pixels=320 * 240 - 1)  # decompression-bomb guard
    assert caught.value.status_code == 422 and "pixels" in caught.value.message


def test_browser_gets_jpeg_as_is_and_other_formats_as_png():
    data = jpeg()
    assert browser_image(data, check_upload(data, MIB, (64, 64))) == (data, "image/jpeg")
    bmp = io.BytesIO()
    Image.open(io.BytesIO(data)).save(bmp, format="BMP")
    shown, mime = browser_image(bmp.getvalue(), check_upload(bmp.getvalue(), MIB, (64, 64)))
    assert mime == "image/png" and Image.open(io.BytesIO(shown)).size == (320, 240)


def wide_png(width=300, height=200) -> bytes:
    """A 16-bit grayscale PNG whose values (1000..60000) all lie above 255: a plain convert() shows it white."""
    ramp = np.linspace(1000, 60000, width * height).reshape(height, width).astype(np.uint16)
    out = io.BytesIO()
    Image.fromarray(ramp).save(out, format="PNG")
    return out.getvalue()


def test_a_16_bit_png_is_shown_windowed_and_the_heat_map_drawn_over_it():
    data = wide_png()
    shown, mime = browser_image(data, check_upload(data, MIB, (64, 64)))
    assert mime == "image/png" and shown != data
    picture = np.asarray(Image.open(io.BytesIO(shown)).convert("L"), np.int32)
    assert picture.shape == (200, 300)
    assert picture.min() <= 2 and picture.max() >= 253  # the whole range, as the model sees it (not all white)
    flat = overlay_heatmap(shown, np.zeros((4, 4), np.float32))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(flat.png)).convert("L"), np.int32), picture)
    eight_bit = support.png_bytes(50, 40)  # an 8-bit PNG goes to the browser as it came
    assert browser_image(eight_bit, check_upload(eight_bit, MIB, (64, 64))) == (eight_bit, "image/png")


def test_overlay_colours_the_hot_region_at_the_image_aspect():
    heat = np.zeros((8, 8), np.float32)
    heat[:, 6:] = 1.0  # right edge hot
    result = overlay_heatmap(jpeg(800, 400), heat[None])
    assert not result.flat
    image = np.asarray(Image.open(io.BytesIO(result.png)).convert("RGB"), np.int32)
    assert image.shape[:2] == (320, 640)  # at most 640 px, 2:1 kept
    red_minus_blue = image[..., 0] - image[..., 2]
    assert red_minus_blue[:, -40:].mean() > 40 > red_minus_blue[:, :40].mean()


def test_a_flat_map_is_reported_and_not_painted():
    data = jpeg(300, 300)
    result = overlay_heatmap(data, np.zeros((1, 10, 10), np.float32))
    assert result.flat
    image = np.asarray(Image.open(io.BytesIO(result.png)).convert("RGB"), np.int32)
    assert np.abs(image[..., 0] - image[..., 2]).max() <= 2  # still grey


def test_probability_text():
    assert format_probability(0.87654) == "0.8765"
    assert format_probability(1.9e-05) == "1.9e-05"
    assert format_probability(0.0) == "0.0000"


def test_settings_come_from_the_config_and_are_checked(tmp_path):
    from cxr_pipeline.config import ConfigError, load_config

    settings = ServingSettings.from_config(
        load_config(overrides=["serving.max_upload_mb=2", "serving.max_queued=3"]), max_upload_mb=0.5
    )
    assert (settings.max_bytes, settings.max_admitted) == (MIB // 2, settings.max_active + 3)
    assert settings.keep_uploads is False
    assert ServingSettings.from_config() == ServingSettings.from_config(load_config())  # defaults.yaml is the home
    with pytest.raises(ConfigError, match="unknown serving option.*max_uploads"):
        ServingSettings.from_config(load_config(overrides=["serving.max_uploads=3"]))
    with pytest.raises(ValueError, match="upload_dir"):
        ServingSettings.from_config(load_config(overrides=["serving.keep_uploads=true"]))
    for bad in (
        "max_upload_mb=-1",
        "max_active=0",
        "retry_after_s=0",
        "allowed_hosts=[]",
        "max_receiving=0",
        "body_grace_s=0",
        "body_min_kb_s=0",
    ):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            ServingSettings.from_config(load_config(overrides=[f"serving.{bad}"]))
    kept = ServingSettings.from_config(None, keep_uploads=True, upload_dir=str(tmp_path))
    assert kept.keep_uploads and kept.upload_dir == str(tmp_path)


@pytest.mark.parametrize(
    "header, name",
    [
        ("127.0.0.1:8000", "127.0.0.1"),
        ("LocalHost", "localhost"),
        ("[::1]:8000", "::1"),
        ("::1", "::1"),
        ("example.org.:443", "example.org"),
        ("", ""),
    ],
)
def test_host_name_of_a_host_header(header, name):
    assert host_name(header) == name


def serve(*args: str, env_token: str | None = None) -> subprocess.CompletedProcess:
    env = support.job_env()
    env.pop("CXR_SERVE_API_TOKEN", None)
    if env_token:
        env["CXR_SERVE_API_TOKEN"] = env_token
    return subprocess.run(
        [sys.executable, "-m", "cxr_pipeline.serving", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_a_non_loopback_bind_needs_a_token_or_insecure(tmp_path):
    """Checked before the model is loaded: an empty folder shows how far start-up got."""
    refused = serve("--model", str(tmp_path), "--host", "0.0.0.0")
    assert refused.returncode == 2
    assert "CXR_SERVE_API_TOKEN" in refused.stderr and "--insecure" in refused.stderr
    assert "not a run folder" not in refused.stderr
    short = serve("--model", str(tmp_path), "--host", "0.0.0.0", env_token="short")
    assert short.returncode == 2 and "at least 16" in short.stderr
    token_file = tmp_path / "token"
    token_file.write_text("a-long-enough-token-0123456789\n")
    for allowed in (
        serve("--model", str(tmp_path), "--host", "0.0.0.0", "--insecure"),
        serve("--model", str(tmp_path), "--host", "0.0.0.0", "--api-token-file", str(token_file)),
        serve("--model", str(tmp_path), "--host", "0.0.0.0", env_token="a-long-enough-token-0123456789"),
    ):
        assert allowed.returncode == 2 and "not a run folder" in allowed.stderr  # got past the check


def test_a_kept_dicom_upload_is_stored_as_png_without_its_header(tmp_path):
    from cxr_pipeline.datasets.dicom_from_images import FAKE_IDENTITY, jpeg_dicom
    from cxr_pipeline.serving.backends import Prediction
    from cxr_pipeline.serving.uploads import UploadKeeper

    data = jpeg_dicom(jpeg(), identity=FAKE_IDENTITY)
    checked = check_upload(data, 10 * MIB, size=(64, 64))
    assert checked.format == "dicom"
    keeper = UploadKeeper(tmp_path / "kept", quota_bytes=10 * MIB)
    saved = keeper.keep(data, checked, Prediction("NORMAL", 0, 0.1, 0.5), "model-1")
    assert saved is not None and saved.suffix == ".png"
    with Image.open(saved) as image:
        assert image.size == (320, 240)
    for path in (tmp_path / "kept").iterdir():
        content = path.read_bytes()
        for planted in (FAKE_IDENTITY.name, FAKE_IDENTITY.birth_date, FAKE_IDENTITY.patient_id):
            assert planted.encode() not in content, (path.name, planted)
