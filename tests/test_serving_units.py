"""Pure parts of the prediction service: upload checks, heat-map overlay, settings (no model, fast)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import serving_support as support
from cxr_pipeline.serving.app import format_probability, settings_from
from cxr_pipeline.serving.backends import overlay_heatmap
from cxr_pipeline.serving.validation import MIB, UploadRejected, browser_image, check_upload


def jpeg(width=320, height=240, seed=1) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def test_a_good_image_passes_and_is_described():
    checked = check_upload(jpeg(), MIB, size=(64, 64))
    assert (checked.format, checked.width, checked.height) == ("jpeg", 320, 240)


@pytest.mark.parametrize("data, status, code", [
    (b"", 400, "empty_upload"),
    (support.not_an_image(), 415, "not_an_image"),
    (support.corrupt_jpeg(jpeg()), 422, "corrupt_image"),
    (support.truncated_jpeg(jpeg()), 422, "corrupt_image"),
])
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


def test_settings_from_config_and_overrides(tmp_path):
    config = {"serving": {"max_upload_mb": 2, "max_batch": 4}, "data": {"max_pixels": 1000}}
    settings = settings_from(config, max_upload_mb=0.5)
    assert (settings.max_bytes, settings.max_batch, settings.max_pixels) == (MIB // 2, 4, 1000)
    assert settings.keep_uploads is False
    with pytest.raises(ValueError, match="upload_dir"):
        settings_from({"serving": {"keep_uploads": True}})
    with pytest.raises(ValueError, match="max_upload_mb"):
        settings_from(None, max_upload_mb=-1)
    kept = settings_from(None, keep_uploads=True, upload_dir=tmp_path)
    assert kept.keep_uploads and kept.upload_dir == tmp_path
