"""Decoding every awkward kind of input, without Spark or TensorFlow."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cxr_pipeline.images.decode import (
    ImageDecodeError,
    decode_batch,
    decode_image,
    decode_image_struct,
    decode_image_structs,
    image_info,
)


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient(width: int, height: int) -> np.ndarray:
    """A horizontal ramp 0..255: orientation and scaling errors show up in it."""
    row = np.linspace(0, 255, width).astype(np.uint8)
    return np.tile(row, (height, 1))


def test_grayscale_jpeg_becomes_rgb_of_requested_size():
    data = encode(Image.fromarray(gradient(120, 80), mode="L"))
    out = decode_image(data, size=(32, 48))
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    # the ramp survives: dark on the left, bright on the right
    assert out[:, :4].mean() < 30 and out[:, -4:].mean() > 225


def test_rgb_png_keeps_colour_channels():
    pixels = np.zeros((40, 40, 3), np.uint8)
    pixels[..., 0] = 200  # pure red
    out = decode_image(encode(Image.fromarray(pixels), "PNG"), size=(20, 20))
    assert (out[..., 0] == 200).all() and (out[..., 1:] == 0).all()


def test_16bit_png_is_windowed_to_its_range():
    # 12-bit data stored in 16 bits, as scanner exports do: must not come out black.
    ramp = np.tile(np.linspace(0, 4095, 64), (16, 1)).astype(np.uint16)
    image = Image.fromarray(ramp)  # mode I;16
    assert image.mode.startswith("I")
    out = decode_image(encode(image, "PNG"), size=(16, 64))
    assert out[..., 0].max() >= 250 and out[..., 0].min() <= 5


def test_cmyk_jpeg_and_palette_and_alpha_become_rgb():
    cmyk = Image.new("CMYK", (30, 30), (0, 255, 255, 0))  # red in CMYK
    out = decode_image(encode(cmyk), size=(10, 10))
    assert out.shape == (10, 10, 3)
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 60

    palette = Image.new("P", (30, 30), 0)
    palette.putpalette([0, 0, 255] + [0] * 765)  # index 0 is blue
    out = decode_image(encode(palette, "PNG"), size=(10, 10))
    assert out[..., 2].mean() > 240 and out[..., 0].mean() < 10

    rgba = Image.new("RGBA", (30, 30), (10, 250, 10, 128))
    out = decode_image(encode(rgba, "PNG"), size=(10, 10))
    assert out.shape == (10, 10, 3) and out[..., 1].mean() > 240


def test_exif_orientation_is_applied():
    image = Image.fromarray(gradient(80, 40), mode="L")  # wide, dark on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the displayed image is tall
    data = encode(image, exif=exif.tobytes())
    out = decode_image(data, size=(80, 40))  # height 80, width 40
    column_means = out[..., 0].mean(axis=1)
    # after rotating 90 CW, the dark left edge is at the top
    assert column_means[:5].mean() < 40 and column_means[-5:].mean() > 215


def test_large_jpeg_draft_decode_matches_full_decode():
    rng = np.random.default_rng(0)
    # smooth "X-ray-like" content: low-frequency blobs + ramp
    base = gradient(1500, 1200).astype(np.float32)
    blobs = np.kron(rng.uniform(-40, 40, (12, 15)), np.ones((100, 100)))
    pixels = np.clip(base * 0.7 + blobs + 40, 0, 255).astype(np.uint8)
    data = encode(Image.fromarray(pixels, mode="L"), quality=90)
    drafted = decode_image(data, size=(299, 299)).astype(np.float32)
    full = np.asarray(Image.fromarray(pixels, mode="L").resize((299, 299), Image.Resampling.BILINEAR)).astype(
        np.float32
    )
    assert np.abs(drafted[..., 0] - full).mean() < 3.0


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "zero-byte file"),
        (None, "missing content"),
        (b"this is a text file, not an image\n" * 10, "not an image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 200, "corrupt"),  # JPEG magic, garbage after
    ],
)
def test_junk_is_rejected_with_a_reason(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data, size=(8, 8))


def test_truncated_jpeg_is_rejected():
    rng = np.random.default_rng(1)
    data = encode(Image.fromarray(rng.integers(0, 255, (200, 200), dtype=np.uint8), mode="L"))
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(data[: len(data) // 2], size=(8, 8))


def test_pixel_count_guard_rejects_before_decoding():
    data = encode(Image.new("L", (2000, 1500)), "PNG")
    with pytest.raises(ImageDecodeError, match="too many pixels"):
        decode_image(data, size=(8, 8), max_pixels=1_000_000)
    assert decode_image(data, size=(8, 8), max_pixels=3_000_000).shape == (8, 8, 3)


def test_image_info_reads_header_only():
    data = encode(Image.new("L", (123, 45)), "PNG")
    assert image_info(data) == (123, 45, "PNG")
    with pytest.raises(ImageDecodeError):
        image_info(b"nope")


def test_decode_batch_separates_good_and_bad():
    good = encode(Image.fromarray(gradient(50, 50), mode="L"))
    arrays, good_idx, failed = decode_batch([good, b"", b"junk", good], size=(16, 16))
    assert arrays.shape == (2, 16, 16, 3)
    assert good_idx == [0, 3]
    assert [i for i, _ in failed] == [1, 2]
    assert failed[0][1] == "zero-byte file" and failed[1][1] == "not an image"
    assert np.array_equal(arrays[0], decode_image(good, size=(16, 16)))


def test_decode_batch_of_nothing():
    arrays, good_idx, failed = decode_batch([], size=(16, 16))
    assert arrays.shape == (0, 16, 16, 3) and good_idx == [] and failed == []


@pytest.mark.parametrize("stage", ["open", "load", "resize"])
def test_out_of_memory_propagates_instead_of_becoming_a_rejection(monkeypatch, stage):
    # A MemoryError says nothing about the image: it must reach the task (retried), never "corrupt image".
    from PIL import ImageFile

    def no_memory(*args, **kwargs):
        raise MemoryError("simulated allocation failure")

    target = {"open": (Image, "open"), "load": (ImageFile.ImageFile, "load"), "resize": (Image.Image, "resize")}[stage]
    data = encode(Image.fromarray(gradient(40, 30), mode="L"))
    monkeypatch.setattr(*target, no_memory)
    with pytest.raises(MemoryError):
        decode_image(data, size=(8, 8))
    with pytest.raises(MemoryError):
        decode_batch([data], size=(8, 8))


def test_enomem_oserror_propagates_but_other_oserrors_are_rejections(monkeypatch):
    import errno

    from PIL import ImageFile

    data = encode(Image.fromarray(gradient(40, 30), mode="L"))

    def fail_with(err):
        def load(*args, **kwargs):
            raise OSError(err, "simulated")

        return load

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail_with(errno.ENOMEM))
    with pytest.raises(OSError):
        decode_image(data, size=(8, 8))
    monkeypatch.setattr(ImageFile.ImageFile, "load", fail_with(errno.EIO))
    with pytest.raises(ImageDecodeError):
        decode_image(data, size=(8, 8))


def test_wide_images_are_windowed_in_strips_with_the_same_result(monkeypatch):
    # The strip-wise window must equal the whole-image float64 formula it replaced, strip edges included.
    import cxr_pipeline.images.decode as imaging

    rng = np.random.default_rng(3)
    pixels = rng.integers(100, 3900, (37, 53), dtype=np.uint16)
    monkeypatch.setattr(imaging, "STRIP_PIXELS", 53 * 4)  # 4 rows a strip, last strip partial
    out = decode_image(encode(Image.fromarray(pixels), "PNG"), size=(37, 53))[..., 0]
    low, high = float(pixels.min()), float(pixels.max())
    expected = ((pixels.astype(np.float64) - low) * (255.0 / (high - low))).round().astype(np.uint8)
    assert np.array_equal(out, expected)


def spark_image_struct(pixels: np.ndarray) -> dict:
    """What Spark's ``image`` data source gives for ``pixels`` (RGB or L): BGR bytes, row-major."""
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else 3
    data = pixels.tobytes() if channels == 1 else np.ascontiguousarray(pixels[..., ::-1]).tobytes()
    return {
        "origin": "file:/x.png",
        "height": height,
        "width": width,
        "nChannels": channels,
        "mode": 0 if channels == 1 else 16,
        "data": data,
    }


def test_spark_image_struct_decodes_like_the_file_itself():
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, 60).astype(np.uint8)  # a red ramp: a BGR/RGB mix-up moves it to blue
    pixels[..., 2] = 17
    from_struct = decode_image_struct(spark_image_struct(pixels), size=(20, 30))
    from_file = decode_image(encode(Image.fromarray(pixels), "PNG"), size=(20, 30))
    assert from_struct.shape == (20, 30, 3) and from_struct.dtype == np.uint8
    assert np.array_equal(from_struct, from_file)
    gray = decode_image_struct(spark_image_struct(gradient(60, 40)), size=(20, 30))
    assert np.array_equal(gray, decode_image(encode(Image.fromarray(gradient(60, 40), mode="L"), "PNG"), (20, 30)))


def test_spark_image_structs_report_undecodable_and_oversized_images():
    good = spark_image_struct(gradient(16, 16))
    undecoded = {"origin": "file:/text.jpeg", "height": -1, "width": -1, "nChannels": -1, "mode": -1, "data": b""}
    short = {**good, "data": good["data"][:-1]}
    arrays, ok, failed = decode_image_structs([good, undecoded, None, short, good], size=(8, 8), max_pixels=1000)
    assert arrays.shape == (2, 8, 8, 3) and ok == [0, 4]
    assert [index for index, _ in failed] == [1, 2, 3]
    assert failed[0][1] == "not decodable by Spark's image source" and "is not 16x16x1" in failed[2][1]
    with pytest.raises(ImageDecodeError, match="too many pixels"):
        decode_image_struct(good, size=(8, 8), max_pixels=100)


def test_equalize_spreads_a_dim_low_contrast_xray_over_the_whole_range():
    dim = (gradient(120, 80) // 4 + 40).astype(np.uint8)  # grey levels 40..103
    data = encode(Image.fromarray(dim, mode="L"), "PNG")
    plain = decode_image(data, size=(40, 60))
    flat = decode_image(data, size=(40, 60), intensity="equalize")
    assert plain.min() >= 40 and plain.max() <= 104
    assert flat.min() < 10 and flat.max() > 245
    assert np.array_equal(flat[..., 0], flat[..., 2])  # still grey
    assert (np.diff(flat[0, :, 0].astype(int)) >= 0).all()  # the ramp keeps its order
    # the same image brighter and with less contrast equalizes to (almost) the same pixels
    brighter = encode(Image.fromarray((dim // 2 + 120).astype(np.uint8), mode="L"), "PNG")
    assert np.abs(decode_image(brighter, (40, 60), intensity="equalize").astype(int) - flat).mean() < 8
    arrays, ok, _ = decode_batch([data], size=(40, 60), intensity="equalize")
    assert ok == [0] and np.array_equal(arrays[0], flat)
    struct = decode_image_struct(spark_image_struct(dim), size=(40, 60), intensity="equalize")
    assert np.array_equal(struct, flat)


def test_unknown_intensity_mode_is_a_setting_error_not_a_rejected_image():
    data = encode(Image.fromarray(gradient(20, 20), mode="L"), "PNG")
    with pytest.raises(ValueError, match="intensity must be one of") as raised:
        decode_image(data, (8, 8), intensity="clahe")
    assert not isinstance(raised.value, ImageDecodeError)
    with pytest.raises(ValueError, match="intensity must be one of"):
        decode_batch([data], (8, 8), intensity="clahe")  # not reported as a failed image


def test_the_module_examples_hold():
    import doctest

    from cxr_pipeline.images import decode as imaging

    assert doctest.testmod(imaging).failed == 0
