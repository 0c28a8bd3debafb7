"""Decoding image bytes into the fixed-size RGB arrays a backbone wants.

Pure functions (Pillow + numpy, no Spark, no TensorFlow), used by the Spark
featurizer inside pandas UDFs, by the Keras CNN job and by serving, so every
component sees exactly the same pixels.

``decode_image`` turns the bytes of one file into a ``uint8`` array of shape
``(height, width, 3)``:

* JPEG *draft mode*: a 1500x1200 X-ray asked for at 299x299 is decoded by
  libjpeg at 1/4 scale (375x300) before the final resize, which is several
  times faster and uses a fraction of the memory of a full decode.
* EXIF orientation is applied.
* Grayscale, 16-bit, float, CMYK, palette and alpha images all become 3-channel
  RGB. 16-bit/32-bit/float images are windowed to their own min..max range
  (scanner exports rarely use the whole 16-bit range).
* DICOM (``DICM`` at byte 128) is decoded by :mod:`cxr_pipeline.images.dicom`: modality
  LUT, VOI LUT / window or a percentile window, MONOCHROME1 inverted, then the
  same resize as any other image.
* The ``image`` struct of Spark's image data source (already decoded by the JVM,
  BGR bytes) becomes the same RGB array: :func:`decode_image_struct`.
* ``intensity="equalize"`` equalizes the grey-level histogram at the source
  resolution, before the resize, so exposure and contrast differences between
  scanners or exports weigh less: :func:`normalize_intensity`. The functions
  here default to ``"none"``; the jobs pass ``data.intensity`` (``equalize`` in
  ``conf/defaults.yaml``), and every saved model records the mode it used.
* ``max_pixels`` (width*height) is ``data.max_pixels`` of the configuration unless a caller passes
  its own (the jobs pass the value their config resolved).
* The image is resized to ``size`` without keeping the aspect ratio, as
  ``keras.utils.image_dataset_from_directory`` does by default.
* Anything that cannot be decoded raises :class:`ImageDecodeError` whose text is
  a short reason ("zero-byte file", "not an image", "truncated image", ...) that
  callers record next to the path. A pixel-count guard rejects decompression
  bombs before any pixel is decompressed.
* Running out of memory is not a property of the image: ``MemoryError`` (and
  ``OSError`` ENOMEM) propagate, so a Spark task is retried and nothing is
  recorded as a rejection.

Peak memory of one decode, besides the input bytes: the decoded source pixels as
the decoder holds them (1 byte per pixel for 8-bit grayscale, 2 for 16-bit, 4 for
32-bit/float, 3 for RGB), plus the full-resolution 8-bit result (1 byte per
pixel), plus one working strip of ``STRIP_PIXELS`` pixels (8 MB of float64 or
int64) whatever the image size. That is about 4 bytes per source pixel for
16-bit PNG, TIFF and DICOM alike (measured with ``bench/bench_decode.py --memory``
on 7700x7700 16-bit: 237 MB for the PNG and for the uncompressed DICOM, where the
whole-image float64 window took 1,542 MB), and the source's own size plus 1-2
bytes per pixel for 32-bit/float images.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .. import config
from . import dicom
from .layout import is_dicom, sniff_image_format
from .pillow_io import STRIP_PIXELS, ImageDecodeError, draft, is_resource_error, load_pixels

DEFAULT_SIZE = (299, 299)  # (height, width), InceptionV3's input
# Formats Pillow may try (JPEG covers MPO); anything else is "not an image" (smaller attack surface).
ALLOWED_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "GIF", "WEBP", "PPM")

_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_NATIVE_MODES = ("L", "RGB")
INTENSITY_MODES = ("none", "equalize")  # data.intensity: see normalize_intensity


def _open(data: bytes | None, max_pixels: int) -> Image.Image:
    if data is None:
        raise ImageDecodeError("missing content")
    if len(data) == 0:
        raise ImageDecodeError("zero-byte file")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels guard below is the one that decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        claimed = sniff_image_format(data[:16])
        reason = f"corrupt {claimed.upper()} header" if claimed else "not an image"
        raise ImageDecodeError(reason) from None
    except Exception as exc:  # noqa: BLE001 - a broken header is a rejection, not a crash
        if is_resource_error(exc):
            raise
        raise ImageDecodeError(f"corrupt image header ({type(exc).__name__})") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError(f"too many pixels ({width}x{height} = {width * height} > max_pixels {max_pixels})")
    return image


def configured_max_pixels(max_pixels: int | None = None) -> int:
    """``max_pixels``, or ``data.max_pixels`` of the configuration (conf/defaults.yaml) when None."""
    return int(config.configured("data.max_pixels") if max_pixels is None else max_pixels)


def image_info(data: bytes, max_pixels: int | None = None) -> tuple[int, int, str]:
    """``(width, height, format)`` from the header only (no pixel decoding); format ``"DICOM"`` for DICOM."""
    max_pixels = configured_max_pixels(max_pixels)
    if data and is_dicom(data):
        header = dicom.read_image_header(data, max_pixels)
        return header.width, header.height, "DICOM"
    image = _open(data, max_pixels)
    return image.size[0], image.size[1], image.format or "unknown"


def _window_to_8bit(image: Image.Image) -> Image.Image:
    """A 16/32-bit or float image windowed to its own min..max, a strip of rows at a time.

    A whole-image float64 copy costs 8 bytes per pixel (1.5 GB for 7700x7700); the strips keep the
    scratch space at ``STRIP_PIXELS`` whatever the image size.
    """
    if image.info.get("cxr-display") == "windowed":  # dicom.DISPLAY_PNG_TEXT: display values, scaled not stretched
        low, high = 0.0, 65535.0
    else:
        low, high = (float(v) for v in image.getextrema())
    scale = 255.0 / (high - low) if high > low else 0.0
    width, height = image.size
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, STRIP_PIXELS // max(1, width))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        strip = np.array(image.crop((0, top, width, bottom)), dtype=np.float64)
        strip -= low  # in place: one float64 strip of scratch, not four
        strip *= scale
        out[top:bottom] = np.round(strip, out=strip)
    return Image.fromarray(out, mode="L")


def _to_8bit(image: Image.Image) -> Image.Image:
    """An ``L`` or ``RGB`` image, whatever the input mode."""
    if image.mode in _NATIVE_MODES:
        return image
    if image.mode in _WIDE_MODES:
        return _window_to_8bit(image)
    if image.mode in ("1", "LA", "La"):
        return image.convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    # CMYK, YCbCr, LAB, HSV, RGBA, RGBa, P, I;16 variants Pillow knows: alpha is dropped.
    return image.convert("RGB")


def to_8bit(image: Image.Image) -> Image.Image:
    """``image`` as an 8-bit ``L`` or ``RGB`` image, as the models see it before the resize
    (16/32-bit and float windowed to their own range; alpha dropped)."""
    return _to_8bit(image)


def normalize_intensity(image: Image.Image, intensity: str = "none") -> Image.Image:
    """An 8-bit ``L``/``RGB`` image with its intensities normalized by ``intensity`` (one of :data:`INTENSITY_MODES`).

    ``equalize``: Pillow's histogram equalization, which maps grey levels through their cumulative
    histogram so that every image spans the full range with a flat histogram. An RGB image is
    equalized per channel (a grey X-ray stored as RGB stays grey).

    >>> from PIL import Image
    >>> dim = Image.fromarray(np.repeat(np.arange(100, 164, dtype=np.uint8), 16).reshape(32, 32))  # levels 100..163
    >>> flat = np.asarray(normalize_intensity(dim, "equalize"))
    >>> int(flat.min()), int(flat.max())
    (0, 255)
    >>> normalize_intensity(dim, "none") is dim
    True
    """
    _check_intensity(intensity)
    if intensity == "equalize":
        return ImageOps.equalize(image)
    return image


def _check_intensity(intensity: str) -> None:
    if intensity not in INTENSITY_MODES:
        raise ValueError(f"intensity must be one of {INTENSITY_MODES}, not {intensity!r}")


def decode_image(
    data: bytes,
    size: tuple[int, int] = DEFAULT_SIZE,
    max_pixels: int | None = None,
    intensity: str = "none",
) -> np.ndarray:
    """Bytes of one image file -> ``uint8`` array ``(size[0], size[1], 3)`` (height, width, RGB).

    ``intensity``: see :func:`normalize_intensity`. Raises :class:`ImageDecodeError` with a short
    reason for anything unusable.
    """
    _check_intensity(intensity)  # a setting, not a property of the image: never a rejection
    max_pixels = configured_max_pixels(max_pixels)
    height, width = size
    if data and is_dicom(data):
        image = dicom.decode_to_image(data, size, max_pixels)
    else:
        image = _open(data, max_pixels)
    try:
        if image.format is not None:  # a file Pillow opened (a DICOM arrives decoded and windowed)
            draft(image, size)
            load_pixels(image)
            try:
                image = ImageOps.exif_transpose(image)
            except Exception as exc:  # noqa: BLE001 - a broken EXIF block must not lose the image
                if is_resource_error(exc):
                    raise
        image = normalize_intensity(_to_8bit(image), intensity)
        # Resize while still 1-channel for grayscale X-rays: 3x less work.
        image = image.resize((width, height), Image.Resampling.BILINEAR)
        if image.mode != "RGB":
            image = image.convert("RGB")
        array = np.asarray(image, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - never let one bad file crash a batch
        if is_resource_error(exc):
            raise
        raise ImageDecodeError(f"corrupt image ({type(exc).__name__}: {exc})") from None
    finally:
        image.close()
    return array


def decode_batch(
    contents: Sequence[bytes | None],
    size: tuple[int, int] = DEFAULT_SIZE,
    max_pixels: int | None = None,
    intensity: str = "none",
) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """Decode many images; bad ones are reported, not raised.

    Returns ``(arrays [n_good, H, W, 3] uint8, good_indices, [(index, reason), ...])``.
    """
    return _decode_each(contents, decode_image, size, configured_max_pixels(max_pixels), intensity)


def _decode_each(items: Sequence, decode, size: tuple[int, int], max_pixels: int, intensity: str):
    height, width = size
    arrays = np.empty((len(items), height, width, 3), dtype=np.uint8)
    good: list[int] = []
    failed: list[tuple[int, str]] = []
    for index, item in enumerate(items):
        try:
            arrays[len(good)] = decode(item, size, max_pixels, intensity)
        except ImageDecodeError as exc:
            failed.append((index, str(exc)))
        else:
            good.append(index)
    return arrays[: len(good)], good, failed


# ----------------------------------------------------------- Spark image source structs
# Spark's ``image`` data source decodes with Java ImageIO into a struct: height, width, nChannels,
# mode (an OpenCV type) and data (BGR[A] bytes, row-major). These turn it into the same RGB arrays.


def decode_image_struct(
    image: Mapping[str, Any] | None,
    size: tuple[int, int] = DEFAULT_SIZE,
    max_pixels: int | None = None,
    intensity: str = "none",
) -> np.ndarray:
    """One Spark image-source struct (a dict) -> ``uint8`` array ``(size[0], size[1], 3)``, RGB."""
    _check_intensity(intensity)
    max_pixels = configured_max_pixels(max_pixels)
    image = image or {}
    height, width, channels = image.get("height"), image.get("width"), image.get("nChannels")
    data = image.get("data")
    if not height or height <= 0 or not width or width <= 0 or data is None:
        raise ImageDecodeError("not decodable by Spark's image source")
    if height * width > max_pixels:
        raise ImageDecodeError(f"too many pixels ({width}x{height} > max_pixels {max_pixels})")
    if channels not in (1, 3, 4) or len(data) != height * width * channels:
        raise ImageDecodeError(f"image struct of {len(data)} bytes is not {width}x{height}x{channels}")
    pixels = np.frombuffer(data, dtype=np.uint8).reshape(height, width, channels)
    if channels == 1:
        picture = Image.fromarray(pixels[..., 0], mode="L")
    else:  # BGR[A] -> RGB
        picture = Image.fromarray(np.ascontiguousarray(pixels[..., 2::-1]), mode="RGB")
    picture = normalize_intensity(picture, intensity)
    out = picture.resize((size[1], size[0]), Image.Resampling.BILINEAR).convert("RGB")
    return np.asarray(out, dtype=np.uint8)


def decode_image_structs(
    images: Sequence[Mapping[str, Any] | None],
    size: tuple[int, int] = DEFAULT_SIZE,
    max_pixels: int | None = None,
    intensity: str = "none",
) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """:func:`decode_batch` for Spark image-source structs: ``(arrays, good_indices, [(index, reason)])``."""
    return _decode_each(images, decode_image_struct, size, configured_max_pixels(max_pixels), intensity)
