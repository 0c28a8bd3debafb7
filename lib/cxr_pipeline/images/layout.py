"""The ``chest_xray`` tree layout: ``<root>/<split>/<CLASS>/<file>``.

Pure functions, no Spark and no I/O: parsing split/label/patient from a path
(local path or any Hadoop URI), the stable label index, and junk detection.
Every component that reads the tree (HDFS loader, Spark reader, Keras job,
prediction) goes through here so they all see the same labels.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

SPLITS = ("train", "val", "test")
DICOM_EXTENSIONS = (".dcm", ".dicom")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png") + DICOM_EXTENSIONS
# A DICOM file says "DICM" after a 128-byte preamble: callers that sniff a file's head must read this many bytes.
DICOM_MAGIC_OFFSET = 128
SNIFF_BYTES = DICOM_MAGIC_OFFSET + 4

# Kermany file names carry the patient: person123_bacteria_456.jpeg,
# IM-0117-0001.jpeg, NORMAL2-IM-1427-0001.jpeg (one patient can have several images).
_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),
    re.compile(r"^((?:NORMAL\d*-)?IM-\d+)-", re.IGNORECASE),
)

_MAGIC = {
    b"\xff\xd8\xff": "jpeg",
    b"\x89PNG\r\n\x1a\n": "png",
}


class LayoutError(ValueError):
    """A path that is not ``<split>/<CLASS>/<file>`` under the dataset root."""


@dataclass(frozen=True)
class ImagePath:
    split: str
    label_name: str
    file_name: str


def _strip_scheme(path: str) -> str:
    # hdfs://host:9000/a/b -> /a/b ; file:///a/b -> /a/b ; plain paths unchanged.
    match = re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*(/.*)?$", path)
    if match:
        return match.group(1) or "/"
    if path.startswith("file:"):
        return path[len("file:") :]
    return path


def parse_image_path(path: str, splits: Sequence[str] = SPLITS) -> ImagePath:
    """Split and class come from the last three path components.

    >>> parse_image_path("hdfs://nn:9000/data/chest_xray/train/NORMAL/IM-1.jpeg")
    ImagePath(split='train', label_name='NORMAL', file_name='IM-1.jpeg')
    """
    parts = [p for p in _strip_scheme(path).split("/") if p]
    if len(parts) < 3:
        raise LayoutError(f"{path}: expected <split>/<CLASS>/<file> under the dataset root")
    split, label_name, file_name = parts[-3:]
    if split not in splits:
        raise LayoutError(
            f"{path}: split folder {split!r} is not one of {', '.join(splits)}; "
            "the tree must look like chest_xray/train/NORMAL/x.jpeg"
        )
    return ImagePath(split=split, label_name=label_name, file_name=file_name)


def relative_image_path(path: str, root: str) -> str:
    """``split/CLASS/file`` of ``path`` relative to the dataset ``root`` (both URIs or paths)."""
    rel = posixpath.relpath(_strip_scheme(path), _strip_scheme(root).rstrip("/") or "/")
    if rel.startswith(".."):
        raise LayoutError(f"{path} is not under {root}")
    return rel


def label_index(label_names: Iterable[str]) -> dict[str, int]:
    """Stable integer labels: class folder names sorted, so NORMAL=0, PNEUMONIA=1."""
    names = sorted(set(label_names))
    if not names:
        raise LayoutError("no class folders found")
    return {name: i for i, name in enumerate(names)}


def invert_label_index(index: Mapping[str, int]) -> list[str]:
    return [name for name, _ in sorted(index.items(), key=lambda kv: kv[1])]


def patient_id(file_name: str) -> str:
    """The patient a Kermany image belongs to; unknown names are their own patient."""
    base = posixpath.basename(file_name)
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(base)
        if match:
            return match.group(1)
    return posixpath.splitext(base)[0]


def is_dicom(head: bytes) -> bool:
    """Whether the bytes start like a DICOM Part 10 file (128-byte preamble, then ``DICM``)."""
    return head[DICOM_MAGIC_OFFSET:SNIFF_BYTES] == b"DICM"


def sniff_image_format(head: bytes) -> str | None:
    """``"jpeg"``/``"png"``/``"dicom"`` from the first bytes of a file (``SNIFF_BYTES`` for DICOM), else None."""
    for magic, fmt in _MAGIC.items():
        if head.startswith(magic):
            return fmt
    if is_dicom(head):
        return "dicom"
    return None


def junk_reason(file_name: str, size: int | None = None, head: bytes | None = None) -> str | None:
    """Why a file in the tree is not an image to use, or None if it looks like one.

    Cheap checks only (name, size, magic bytes); full decoding happens later and
    records its own rejections.
    """
    base = posixpath.basename(file_name)
    if base.startswith("."):
        return "hidden file"
    if not base.lower().endswith(IMAGE_EXTENSIONS):
        return "not an image extension"
    if size == 0:
        return "zero-byte file"
    if head is not None and sniff_image_format(head) is None:
        if len(head) < SNIFF_BYTES and base.lower().endswith(DICOM_EXTENSIONS):
            return None  # too short a head to see DICM at byte 128: the decoder decides
        return "not an image (bad magic bytes)"
    return None
