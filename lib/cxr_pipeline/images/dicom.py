"""DICOM input: pixels the way a radiologist's viewer shows them, and no patient data out.

Pure functions (pydicom + python-gdcm + Pillow + numpy), called through
:func:`cxr_pipeline.images.decode.decode_image` for any bytes with ``DICM`` at byte 128,
so every component (featurizer, CNN, prediction, serving) decodes DICOM the same way.

Decoding (:func:`decode_to_image`), in the order the DICOM standard (PS3.3 C.11) applies them:

1. Header checks before any pixel is decompressed: an image at all (structured reports,
   presentation states and other non-image SOP classes have no Rows/Columns), one frame only,
   the ``max_pixels`` guard on Rows x Columns, a photometric interpretation we can show.
2. Pixels: JPEG baseline monochrome frames go to Pillow with the same draft mode as a ``.jpeg``
   file (so a JPEG wrapped in DICOM gives the very same pixels); every other transfer syntax goes
   through ``pydicom.pixels.pixel_array`` (native, RLE in pydicom; JPEG lossless / extended,
   JPEG-LS and JPEG 2000 through python-gdcm).
3. Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence), then the VOI LUT Sequence
   or the first Window Center/Width (LINEAR, LINEAR_EXACT, SIGMOID) when present; else, for data
   wider than 8 bits, a robust window from the ``PERCENTILE_WINDOW`` percentiles of the image's own
   values (8-bit data is already display data and keeps its full range). MONOCHROME1 is inverted.
   All of this is one lookup table over the stored values (at most 65,536 entries), applied a
   strip of rows at a time: the memory bound of :mod:`cxr_pipeline.images.decode` holds for DICOM too.

The result is an 8-bit ``L`` (or ``RGB`` for colour secondary captures) Pillow image that
``decode_image`` resizes like any other.

De-identification: nothing here returns a header value that identifies a person.
:func:`read_facts` gives the view position, modality and a *keyed hash* of PatientID
(HMAC-SHA256 with ``dicom.patient_key`` from the config, :func:`patient_pseudonym`); the raw
PatientID, PatientName, PatientBirthDate and every other header value stay inside this module.
Rejection reasons name only the problem and standard dictionary names (transfer syntax, SOP
class), never a header value, and pydicom's warnings (which may quote invalid values) are
silenced while reading.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import io
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .pillow_io import STRIP_PIXELS, ImageDecodeError, draft, is_resource_error, load_pixels

FRONTAL_VIEWS = ("PA", "AP")
# ViewPosition as kept (read_facts): the standard's Defined Terms (PS3.3 C.8.11.5) and the common LATERAL/LAT;
# any other value becomes OTHER_VIEW, so a free-text header string never reaches a table or a rejection.
KNOWN_VIEWS = (*FRONTAL_VIEWS, "LL", "RL", "RLD", "LLD", "RLO", "LLO", "LATERAL", "LAT")
OTHER_VIEW = "OTHER"
PERCENTILE_WINDOW = (0.5, 99.5)  # % of pixels clipped to black / white when no window is given
MAX_TABLE_LEVELS = 1 << 16  # stored values may span 16 bits (BitsStored <= 16, every CR/DX image)
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
# The standard's other photometric interpretations (PS3.3 C.7.6.3.1.2): named in a rejection, any other value is not
_UNSUPPORTED_PHOTOMETRIC = ("PALETTE COLOR", "HSV", "ARGB", "CMYK", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "XYB")
_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
PNG_BITS = (8, 16)
# PNG text chunk of a 16-bit PNG that holds *display* values (pack_payload): imaging scales it by 255/65535
# instead of stretching its own min..max, so it decodes like the DICOM it came from.
DISPLAY_PNG_TEXT = ("cxr-display", "windowed")


@dataclass(frozen=True)
class DicomSettings:
    """The ``dicom:`` section of ``conf/defaults.yaml``."""

    patient_key: str
    frontal_only: bool
    packed_png_bits: int  # jobs/pack_images.py: a decoded DICOM is stored as an 8- or 16-bit PNG

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DicomSettings:
        from .. import config as config_mod

        return config_mod.section_settings(cls, config, "dicom")

    def validate(self) -> None:
        from ..config import ConfigError

        if not self.patient_key:
            raise ConfigError("dicom.patient_key is empty: set a secret key (--set dicom.patient_key=...)")
        if self.packed_png_bits not in PNG_BITS:
            raise ConfigError(f"dicom.packed_png_bits must be 8 or 16, got {self.packed_png_bits!r}")

    @classmethod
    def default(cls) -> DicomSettings:
        from .. import config as config_mod

        return cls.from_config(config_mod.load_config())

    def uses_published_key(self) -> bool:
        """Whether ``patient_key`` is still the one conf/defaults.yaml publishes (see PUBLISHED_KEY_WARNING)."""
        from .. import config as config_mod
        from ..paths import CONF_DIR

        return self.patient_key == config_mod.read_yaml(CONF_DIR / "defaults.yaml")["dicom"]["patient_key"]


# Training on DICOM warns rather than refuses: its pseudonyms only group the validation split and are not
# written (tests/test_phi.py scans every byte a DICOM run writes), so a first try with the sample key is safe.
PUBLISHED_KEY_WARNING = (
    "DICOM patient pseudonyms were made with the published dicom.patient_key of conf/defaults.yaml: anyone "
    "can recompute them from PatientIDs. Set a secret key of your own in a site config kept out of git "
    "(--conf site.yaml with dicom: {patient_key: ...}) before training on real patients' images."
)


@dataclass(frozen=True)
class ImageHeader:
    """What the header says about the image; no patient data."""

    width: int
    height: int
    transfer_syntax: str
    photometric: str
    bits_stored: int


@dataclass(frozen=True)
class DicomFacts:
    """De-identified header facts kept next to an image (reader, packed table)."""

    patient: str | None  # keyed hash of PatientID, None when the header has none
    view_position: str | None  # one of KNOWN_VIEWS as the header writes it, else OTHER_VIEW
    modality: str | None  # CR, DX, ...


def patient_pseudonym(patient_id: str, key: str) -> str:
    """``pt-`` + 16 hex digits of HMAC-SHA256(key, PatientID): stable per key, not reversible without it.

    No dot and no Kermany file-name pattern in it, so ``dataset_layout.patient_id`` returns it unchanged.
    """
    digest = hmac.new(key.encode("utf-8"), patient_id.strip().encode("utf-8"), hashlib.sha256).hexdigest()
    return f"pt-{digest[:16]}"


def is_frontal(view_position: str | None) -> bool:
    return (view_position or "").strip().upper() in FRONTAL_VIEWS


_pydicom_configured = False


def _configure_pydicom() -> None:
    """pydicom warns *and logs* invalid values by quoting them, which could put a name or a date into a log.

    Validation of values we never show is switched off, and pydicom's logger no longer reaches the
    application's handlers (it is process-wide state: this package is pydicom's only user in its processes).
    """
    global _pydicom_configured
    if _pydicom_configured:
        return
    import logging

    from pydicom import config as pydicom_config

    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    logging.getLogger("pydicom").propagate = False
    _pydicom_configured = True


@contextmanager
def _quiet() -> Iterator[None]:
    _configure_pydicom()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _rejecting_surprises(function):
    """Any unexpected error from an odd header (a LUT, a VR) is a rejection, not a crash; running out of
    memory still propagates. The reason names the error type only: a pydicom message may quote a value."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except ImageDecodeError:
            raise
        except Exception as exc:  # noqa: BLE001
            if is_resource_error(exc):
                raise
            raise ImageDecodeError(f"corrupt DICOM ({type(exc).__name__})") from None

    return wrapper


def _dataset(data: bytes, stop_before_pixels: bool = True):
    import pydicom

    try:
        with _quiet():
            return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a rejection; its text may quote values
        if is_resource_error(exc):
            raise
        raise ImageDecodeError(f"corrupt DICOM header ({type(exc).__name__})") from None


def _uid_name(value: Any) -> str | None:
    """The DICOM dictionary's name of a UID, None when it has none: never the header's own string (pydicom's
    ``UID.name`` gives the UID itself back when its dictionary lacks it)."""
    from pydicom.uid import UID

    uid = str(value or "").strip()
    name = UID(uid).name if uid else uid
    return name if name != uid else None


def _sop_class(ds) -> str:
    return _uid_name(ds.get("SOPClassUID")) or "an unknown SOP class"


def _no_decoder(transfer_syntax: str) -> str:
    name = _uid_name(transfer_syntax)
    return f"no decoder for DICOM transfer syntax {name}" if name else "no decoder for an unknown DICOM transfer syntax"


def _has_decoder(transfer_syntax: str) -> bool:
    """Whether pydicom has a decoder for the transfer syntax with a plugin installed (True when the file
    names none: pydicom then reads it as native data)."""
    from pydicom.pixels import get_decoder

    if not transfer_syntax:
        return True
    try:
        return get_decoder(transfer_syntax).is_available
    except (NotImplementedError, ValueError):
        return False


def _transfer_syntax(ds) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def _header(ds, max_pixels: int) -> ImageHeader:
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageDecodeError(f"DICOM without an image ({_sop_class(ds)})")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        bits_stored = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    except (TypeError, ValueError):
        raise ImageDecodeError("corrupt DICOM header (Rows, Columns, NumberOfFrames or BitsStored)") from None
    if rows <= 0 or columns <= 0:
        raise ImageDecodeError(f"invalid image size {columns}x{rows}")
    if frames != 1:
        raise ImageDecodeError(f"multi-frame DICOM ({frames} frames): only single-frame images are read")
    if rows * columns > max_pixels:
        raise ImageDecodeError(f"too many pixels ({columns}x{rows} = {rows * columns} > max_pixels {max_pixels})")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in _MONOCHROME + _COLOUR:
        raise ImageDecodeError(f"unsupported DICOM photometric interpretation {_standard_term(photometric)}")
    if bits_stored > 16:
        raise ImageDecodeError(f"DICOM pixel values wider than 16 bits (BitsStored {bits_stored})")
    return ImageHeader(columns, rows, _transfer_syntax(ds), photometric, bits_stored)


def _standard_term(photometric: str) -> str:
    """An unsupported photometric interpretation as named in a rejection: a term of the standard, or no name."""
    return photometric if photometric in _UNSUPPORTED_PHOTOMETRIC else "(not a term of the standard)"


@_rejecting_surprises
def read_image_header(data: bytes, max_pixels: int) -> ImageHeader:
    """The header checks of :func:`decode_to_image`, without touching pixel data."""
    with _quiet():
        return _header(_dataset(data), max_pixels)


@_rejecting_surprises
def read_facts(data: bytes, patient_key: str) -> DicomFacts:
    """De-identified facts from the header (the view as a known term, see ``KNOWN_VIEWS``); raises
    :class:`ImageDecodeError` for a broken header."""
    with _quiet():
        ds = _dataset(data)
        patient_id = str(ds.get("PatientID") or "").strip()
        view = str(ds.get("ViewPosition") or "").strip().upper() or None
        modality = str(ds.get("Modality") or "").strip().upper() or None
    return DicomFacts(patient_pseudonym(patient_id, patient_key) if patient_id else None, _known_view(view), modality)


def _known_view(view: str | None) -> str | None:
    return view if view is None or view in KNOWN_VIEWS else OTHER_VIEW


# ---------------------------------------------------------------- windowing


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2/C.11.2.1.3 VOI functions, output in [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    center, width = center - 0.5, width - 1.0  # LINEAR
    if width <= 0:
        return (values > center).astype(np.float64)
    return np.clip((values - center) / width + 0.5, 0.0, 1.0)


def _first(value: Any) -> float:
    """The first of a multi-valued Window Center/Width (alternative views): the default view."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        value = value[0]
    return float(value)


def _voi(ds, values: np.ndarray) -> np.ndarray | None:
    """The VOI transform of ``values`` in [0, 1], or None when the header gives none."""
    from pydicom.pixels import apply_voi

    sequence = ds.get("VOILUTSequence")
    if sequence and sequence[0].get("LUTDescriptor") is not None and sequence[0].get("LUTData") is not None:
        out = apply_voi(values, ds).astype(np.float64)
        table = np.asarray(sequence[0].LUTData, dtype=np.float64)
        # Normalised by the table's own range: many vendors declare 16 bits and fill 12.
        low, high = float(table.min()), float(table.max())
        return (out - low) / (high - low) if high > low else np.zeros_like(out)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        center, width = _first(center), _first(width)
    except (TypeError, ValueError, IndexError):
        return None
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if width <= 0 or function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        return None  # an unusable window is treated as no window
    return _window(values, center, width, function)


def _weighted_percentiles(values: np.ndarray, counts: np.ndarray, percents: tuple[float, float]) -> tuple[float, float]:
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(counts[order])
    total = cumulative[-1]
    picks = np.searchsorted(cumulative, [p / 100.0 * total for p in percents], side="left")
    picks = np.minimum(picks, len(order) - 1)
    return float(values[order][picks[0]]), float(values[order][picks[1]])


def gray_table(ds, low: int, high: int, counts: np.ndarray, bits_stored: int, out_bits: int = 8) -> np.ndarray:
    """Display value (uint8, or uint16 with ``out_bits=16``) for each stored value ``low..high``: modality LUT,
    VOI, MONOCHROME1.

    ``counts[i]`` is how many pixels hold ``low + i`` (for the percentile window).
    """
    from pydicom.pixels import apply_modality_lut

    stored = np.arange(low, high + 1, dtype=np.int64)
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    shown = _voi(ds, values)
    if shown is None:
        if bits_stored <= 8 and "ModalityLUTSequence" not in ds:
            # 8-bit data is display data already (digitised film, secondary capture): keep its full range.
            top = float((1 << bits_stored) - 1)
            lo_value, hi_value = (float(v) for v in apply_modality_lut(np.array([0, top]), ds))
        else:
            lo_value, hi_value = _weighted_percentiles(values, counts, PERCENTILE_WINDOW)
        if hi_value < lo_value:
            lo_value, hi_value = hi_value, lo_value
        span = hi_value - lo_value
        shown = np.clip((values - lo_value) / span, 0.0, 1.0) if span > 0 else np.zeros_like(values)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        shown = 1.0 - shown
    top = (1 << out_bits) - 1
    return np.rint(shown * top).astype(np.uint8 if out_bits == 8 else np.uint16)


def _strips(height: int, width: int) -> Iterator[tuple[int, int]]:
    rows = max(1, STRIP_PIXELS // max(1, width))
    for top in range(0, height, rows):
        yield top, min(height, top + rows)


def _gray_array_to_image(ds, pixels: np.ndarray, bits_stored: int, out_bits: int = 8) -> Image.Image:
    """A 2-D stored-value array -> windowed 8-bit ``L`` (or 16-bit ``I;16``) image, a strip of rows at a time."""
    if not np.issubdtype(pixels.dtype, np.integer):
        raise ImageDecodeError(f"unsupported DICOM pixel type {pixels.dtype} (float pixel data)")
    low, high = int(pixels.min()), int(pixels.max())
    if high - low + 1 > MAX_TABLE_LEVELS:
        raise ImageDecodeError(f"DICOM pixel values span more than 16 bits ({low}..{high})")
    height, width = pixels.shape
    counts = np.zeros(high - low + 1, dtype=np.int64)
    for top, bottom in _strips(height, width):
        index = pixels[top:bottom].astype(np.int64)
        index -= low
        counts += np.bincount(index.ravel(), minlength=len(counts))
    table = gray_table(ds, low, high, counts, bits_stored, out_bits)
    out = np.empty((height, width), dtype=table.dtype)
    for top, bottom in _strips(height, width):
        index = pixels[top:bottom].astype(np.int64)
        index -= low
        out[top:bottom] = table[index]
    return Image.fromarray(out)  # L for uint8, I;16 for uint16


def _jpeg_frame(data: bytes) -> bytes:
    from pydicom.encaps import generate_frames

    ds = _dataset(data, stop_before_pixels=False)
    if "PixelData" not in ds:
        raise ImageDecodeError(f"DICOM without pixel data ({_sop_class(ds)})")
    try:
        return next(generate_frames(ds.PixelData, number_of_frames=1))
    except Exception as exc:  # noqa: BLE001
        if is_resource_error(exc):
            raise
        raise ImageDecodeError(f"corrupt DICOM pixel data ({type(exc).__name__})") from None


def _decode_jpeg_baseline(
    ds, data: bytes, header: ImageHeader, size: tuple[int, int], out_bits: int = 8
) -> Image.Image:
    """The encapsulated JPEG through Pillow, exactly as a ``.jpeg`` file: draft mode, then the 256-entry table."""
    frame = _jpeg_frame(data)
    try:
        with _quiet():
            image = Image.open(io.BytesIO(frame), formats=["JPEG"])
    except Exception as exc:  # noqa: BLE001
        if is_resource_error(exc):
            raise
        raise ImageDecodeError(f"corrupt JPEG in DICOM ({type(exc).__name__})") from None
    if image.size != (header.width, header.height):
        raise ImageDecodeError(
            f"corrupt DICOM: JPEG frame is {image.size[0]}x{image.size[1]}, header says {header.width}x{header.height}"
        )
    draft(image, size)
    load_pixels(image)
    if image.mode != "L":
        image = image.convert("L")
    counts = np.asarray(image.histogram()[:256], dtype=np.int64)
    table = gray_table(ds, 0, 255, counts, min(header.bits_stored, 8), out_bits)
    if out_bits == 8:
        return image.point(table.tolist())
    return Image.fromarray(table[np.asarray(image)])


def _decode_pixels(data: bytes, header: ImageHeader) -> np.ndarray:
    from pydicom.pixels import pixel_array

    try:
        with _quiet():
            return pixel_array(io.BytesIO(data), index=0)
    except Exception as exc:  # noqa: BLE001
        if is_resource_error(exc):
            raise
        text = str(exc)
        if "has no 'Pixel Data'" in text:
            raise ImageDecodeError("DICOM without pixel data") from None
        missing_plugin = isinstance(exc, (NotImplementedError, RuntimeError)) and "plugin" in text.lower()
        if missing_plugin or not _has_decoder(header.transfer_syntax):
            raise ImageDecodeError(_no_decoder(header.transfer_syntax)) from None
        # pydicom's message is left out: it may quote a header value
        raise ImageDecodeError(f"corrupt DICOM pixel data ({type(exc).__name__})") from None


@_rejecting_surprises
def decode_to_image(data: bytes, size: tuple[int, int], max_pixels: int, out_bits: int = 8) -> Image.Image:
    """DICOM bytes -> windowed 8-bit Pillow image (``L``, or ``RGB`` for colour), not yet resized.

    ``size`` (height, width) only lets a JPEG-baseline frame decode in draft mode, as a ``.jpeg`` does.
    ``out_bits=16``: monochrome images as 16-bit ``I;16`` display values (for packing); colour stays 8-bit.
    """
    with _quiet():
        ds = _dataset(data)
        header = _header(ds, max_pixels)
        if header.transfer_syntax == _JPEG_BASELINE and header.photometric in _MONOCHROME:
            return _decode_jpeg_baseline(ds, data, header, size, out_bits)
        pixels = _decode_pixels(data, header)
        if header.photometric in _MONOCHROME:
            if pixels.ndim != 2:
                raise ImageDecodeError(f"corrupt DICOM: monochrome pixel data of shape {pixels.shape}")
            return _gray_array_to_image(ds, pixels, header.bits_stored, out_bits)
    if pixels.ndim != 3 or pixels.dtype != np.uint8:
        raise ImageDecodeError(f"unsupported colour DICOM ({pixels.dtype}, shape {pixels.shape})")
    return Image.fromarray(pixels, mode="RGB")  # pydicom converted YBR to RGB


# ---------------------------------------------------------------- packing

_FULL_SIZE = (1 << 30, 1 << 30)  # a draft target no image reaches: decode at full resolution


def pack_payload(data: bytes, max_pixels: int, png_bits: int = 8) -> tuple[bytes, str, int, int]:
    """``(bytes, format, width, height)`` that decode like the DICOM, with no header (no patient data).

    A JPEG-baseline frame whose display table is the identity is stored as that JPEG, unchanged (later
    decodes take the same draft-mode path); everything else as the windowed PNG at full resolution:
    8-bit, or with ``png_bits=16`` the display values at 16 bits (``I;16``, tagged ``DISPLAY_PNG_TEXT`` so
    :func:`cxr_pipeline.images.decode.decode_image` scales it by 255/65535, i.e. gives the DICOM's own 8-bit
    display values; a value may round to the neighbouring level where the display value is x.5 within 0.002).
    """
    if png_bits not in PNG_BITS:  # a caller's mistake, not the file's: raised before any file error becomes a rejection
        raise ValueError(f"png_bits must be 8 or 16, got {png_bits!r}")
    return _pack_payload(data, max_pixels, png_bits)


@_rejecting_surprises
def _pack_payload(data: bytes, max_pixels: int, png_bits: int) -> tuple[bytes, str, int, int]:
    with _quiet():
        ds = _dataset(data)
        header = _header(ds, max_pixels)
        if header.transfer_syntax == _JPEG_BASELINE and header.photometric in _MONOCHROME:
            identity = gray_table(ds, 0, 255, np.ones(256, dtype=np.int64), min(header.bits_stored, 8))
            if np.array_equal(identity, np.arange(256)):
                frame = _jpeg_frame(data)
                return frame, "JPEG", header.width, header.height
    image = decode_to_image(data, _FULL_SIZE, max_pixels, png_bits)
    out = io.BytesIO()
    if image.mode == "I;16":
        from PIL import PngImagePlugin

        text = PngImagePlugin.PngInfo()
        text.add_text(*DISPLAY_PNG_TEXT)
        image.save(out, format="PNG", pnginfo=text)
    else:
        image.save(out, format="PNG")
    return out.getvalue(), "PNG", image.size[0], image.size[1]
