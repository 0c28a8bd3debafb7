"""Checks on an uploaded file before the model sees it.

The decoding check is :func:`cxr_pipeline.images.decode.decode_image`, the same one
the batch jobs use, so the service rejects exactly what they reject. Each
rejection carries an HTTP status, a stable code and a sentence for a person.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

MIB = 1024 * 1024
# imaging.decode_image's reason for bytes no image decoder recognises (-> 415, not 422)
NOT_AN_IMAGE = "not an image"
# PNG modes a browser (and the heat-map overlay) shows as the model sees them; wider ones are windowed first.
SHOWN_AS_IS = ("1", "L", "LA", "P", "RGB", "RGBA")


@dataclass
class UploadRejected(Exception):
    status_code: int
    code: str
    message: str

    def __str__(self) -> str:
        return self.message

    def as_json(self) -> dict[str, str]:
        return {"detail": self.message, "code": self.code}


@dataclass(frozen=True)
class CheckedImage:
    format: str  # "jpeg", "png", "dicom", or what Pillow calls it (never a DICOM header value)
    width: int
    height: int


def describe_size(n_bytes: float) -> str:
    if n_bytes < 1024:
        return f"{n_bytes:.0f} bytes"
    if n_bytes >= MIB:
        return f"{n_bytes / MIB:.1f} MB"
    return f"{n_bytes / 1024:.0f} kB"


def too_large(size: int | None, max_bytes: int) -> UploadRejected:
    what = f"The upload is {describe_size(size)}" if size is not None else "The upload is too large"
    return UploadRejected(413, "too_large", f"{what}; the limit is {describe_size(max_bytes)}.")


def check_upload(data: bytes, max_bytes: int, size: tuple[int, int], max_pixels: int | None = None) -> CheckedImage:
    """Raise :class:`UploadRejected` unless ``data`` is a decodable image within the limits."""
    from cxr_pipeline.images.decode import ImageDecodeError, configured_max_pixels, decode_image, image_info

    if not data:
        raise UploadRejected(400, "empty_upload", "The uploaded file is empty (0 bytes): choose an X-ray image.")
    if len(data) > max_bytes:
        raise too_large(len(data), max_bytes)
    max_pixels = configured_max_pixels(max_pixels)
    try:
        decode_image(data, size=size, max_pixels=max_pixels)
        width, height, fmt = image_info(data, max_pixels)
    except ImageDecodeError as err:
        if str(err) == NOT_AN_IMAGE:
            raise UploadRejected(
                415, "not_an_image", "This file is not an image: upload a JPEG, PNG or DICOM chest X-ray."
            ) from err
        raise UploadRejected(422, "corrupt_image", f"The image could not be read ({err}).") from err
    return CheckedImage(format=fmt.lower(), width=width, height=height)


def browser_image(data: bytes, checked: CheckedImage, max_side: int = 1024) -> tuple[bytes, str]:
    """``(bytes, mime)`` a browser can show: the upload itself if JPEG or 8-bit PNG, else a PNG copy.

    The copy is windowed as the model sees it (16-bit and float images to their range, DICOM by its
    LUTs, MONOCHROME1 inverted); the heat map is drawn over the same picture. A DICOM is never sent
    back as DICOM: its header holds patient data.
    """
    from PIL import Image

    if checked.format == "jpeg":
        return data, "image/jpeg"
    if checked.format == "dicom":
        from cxr_pipeline.images import dicom

        copy = dicom.decode_to_image(data, (max_side, max_side), checked.width * checked.height).convert("RGB")
    else:
        from cxr_pipeline.images.decode import to_8bit

        with Image.open(io.BytesIO(data)) as img:
            if checked.format == "png" and img.mode in SHOWN_AS_IS:
                return data, "image/png"
            copy = to_8bit(img).convert("RGB")
    copy.thumbnail((max_side, max_side))
    out = io.BytesIO()
    copy.save(out, format="PNG")
    return out.getvalue(), "image/png"
