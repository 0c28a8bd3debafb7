"""The low-level pieces every decoder shares (:mod:`cxr_pipeline.images.decode` for image files,
:mod:`cxr_pipeline.images.dicom` for DICOM): the rejection error, the out-of-memory test, JPEG draft mode,
a load that turns decoder failures into rejections, and the strip size that bounds windowing scratch.

Both decoders import this module and neither imports the other's internals, so the import graph has no circle.
"""

from __future__ import annotations

import errno

from PIL import Image

STRIP_PIXELS = 1 << 20  # wide images are windowed this many pixels at a time (bounded float64 scratch)


class ImageDecodeError(ValueError):
    """An input that is not a usable image; ``str(error)`` is a short reason."""


def is_resource_error(exc: BaseException) -> bool:
    """Out of memory is the machine's state, not the image's: such errors must propagate, never be a rejection."""
    return isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM)


def _orientation_swaps_axes(image: Image.Image) -> bool:
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block just means "no orientation"
        return False
    return orientation in (5, 6, 7, 8)


def draft(image: Image.Image, size: tuple[int, int]) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below the target ``size`` (height, width)."""
    if image.format not in ("JPEG", "MPO"):
        return
    height, width = size
    if _orientation_swaps_axes(image):
        width, height = height, width
    image.draft(None, (width, height))


def load_pixels(image: Image.Image) -> None:
    """``image.load()``; a truncated or corrupt file raises :class:`ImageDecodeError`, out of memory propagates."""
    try:
        image.load()
    except OSError as exc:
        if is_resource_error(exc):
            raise
        reason = "truncated image" if "truncated" in str(exc).lower() else f"corrupt image ({exc})"
        raise ImageDecodeError(reason) from None
    except Exception as exc:  # noqa: BLE001 - decoders raise SyntaxError, ValueError, struct.error...
        if is_resource_error(exc):
            raise
        raise ImageDecodeError(f"corrupt image ({type(exc).__name__}: {exc})") from None
