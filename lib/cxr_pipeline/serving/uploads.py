"""An upload decoded once (the model, Grad-CAM and the page share its pixels), and kept on disk when
``serving.keep_uploads`` is on."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from .backends import Prediction
from .validation import CheckedImage, UploadRejected, browser_image, check_upload

log = logging.getLogger(__name__)


def decode_upload(
    data: bytes, max_bytes: int, size: tuple[int, int], max_pixels: int | None, intensity: str = "none"
) -> tuple[CheckedImage, np.ndarray]:
    """``(description, pixels at the model's size)``, or :class:`UploadRejected` with validation's verdict.

    An accepted upload is decoded once, here (the model, Grad-CAM and the
    page use these pixels); :func:`.validation.check_upload` is asked only about
    bytes the decoder refuses, for its status and message.
    """
    from cxr_pipeline.images.decode import ImageDecodeError, configured_max_pixels, decode_image, image_info

    max_pixels = configured_max_pixels(max_pixels)
    if not data or len(data) > max_bytes:
        check_upload(data, max_bytes, size=size, max_pixels=max_pixels)  # raises: empty / too large
    try:
        pixels = decode_image(data, size=size, max_pixels=max_pixels, intensity=intensity)
        width, height, fmt = image_info(data, max_pixels)
    except ImageDecodeError as err:
        check_upload(data, max_bytes, size=size, max_pixels=max_pixels)  # raises validation's verdict
        raise UploadRejected(422, "corrupt_image", f"The image could not be read ({err}).") from err
    return CheckedImage(format=fmt.lower(), width=width, height=height), pixels


class UploadKeeper:
    """Saves accepted uploads (mode 0600, generated names) while ``upload_dir`` holds under ``quota_bytes``.

    Never raises: a full quota or a failed write is logged, and the prediction is answered all the same.
    """

    def __init__(self, folder: Path, quota_bytes: int):
        self.folder, self.quota_bytes = Path(folder), int(quota_bytes)
        self._lock = threading.Lock()
        self._used: int | None = None  # bytes in the folder, counted on first use
        self.saved = self.skipped = 0

    def keep(self, data: bytes, checked: CheckedImage, prediction: Prediction, model_id: str) -> Path | None:
        stem = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}"
        if checked.format == "dicom":  # never the DICOM itself: its header holds names and birth dates
            try:
                data, _ = browser_image(data, checked, max_side=max(checked.width, checked.height))
            except Exception:  # noqa: BLE001 - keeping is best effort, the prediction is answered anyway
                self.skipped += 1
                log.exception("upload not kept: the DICOM could not be rendered to PNG")
                return None
            checked = CheckedImage(format="png", width=checked.width, height=checked.height)
        image_path = self.folder / f"{stem}.{'jpeg' if checked.format == 'jpeg' else checked.format or 'img'}"
        record = json.dumps(
            {
                "model_id": model_id,
                "label_name": prediction.label_name,
                "probability": prediction.probability,
                "threshold": prediction.threshold,
                "width": checked.width,
                "height": checked.height,
            },
            indent=1,
        ).encode()
        size = len(data) + len(record)
        try:
            with self._lock:
                used = self._used if self._used is not None else self._count()
                if used + size > self.quota_bytes:
                    self.skipped += 1
                    log.warning(
                        "upload not kept: %s would pass serving.upload_quota_mb (%d of %d bytes used)",
                        self.folder,
                        used,
                        self.quota_bytes,
                    )
                    return None
                self._used = used + size
            write_private(image_path, data)
            write_private(self.folder / f"{stem}.json", record)
        except OSError:
            self.skipped += 1
            log.exception("upload not kept: writing under %s failed; the prediction is answered anyway", self.folder)
            return None
        self.saved += 1
        return image_path

    def _count(self) -> int:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())


def write_private(path: Path, data: bytes) -> None:
    """A new file readable by the service's user only (0600 whatever the umask); never overwrites."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
