"""DICOM files made from ordinary X-ray images, with PLANTED fake patient data (tests, benchmarks, demos).

No real DICOM chest X-ray can be downloaded here, so the tests and ``bench/bench_decode.py`` wrap
the real sample JPEGs the way a PACS would hand them over:

* ``jpeg_dicom``: the JPEG bytes unchanged as encapsulated JPEG-baseline pixel data;
* ``native_dicom``: uncompressed 8/12/16-bit pixels, MONOCHROME1 or 2, optional window and
  rescale tags;

each with ``FAKE_IDENTITY`` (a made-up name, birth date, PatientID, institution, referring physician and
accession number) planted in the header, so a test can scan every output for those values. Nothing here
is used by the pipeline itself.

    python -m cxr_pipeline.datasets.dicom_from_images --src data/sample/chest_xray --out data/dicom/chest_xray
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_pipeline.cli import Command, Job, add_config_options, run

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DIGITAL_XRAY = "1.2.840.10008.5.1.4.1.1.1.1"  # DX Image Storage - For Presentation


@dataclass(frozen=True)
class Identity:
    name: str
    birth_date: str  # DICOM DA: YYYYMMDD
    patient_id: str
    institution: str = "Planted Quorvane Memorial Hospital"
    referring_physician: str = "Drplanted^Xavierzembla"
    accession_number: str = "ACC-PLANTED-9021"  # VR SH: at most 16 characters

    def values(self) -> tuple[str, ...]:
        """The strings that must never appear in an output: every planted value, person-name parts and the
        birth date also as ``YYYY-MM-DD`` (compare case-insensitively)."""
        date = self.birth_date
        return (
            self.name,
            *self.name.split("^"),
            date,
            f"{date[:4]}-{date[4:6]}-{date[6:]}",
            self.patient_id,
            self.institution,
            self.referring_physician,
            *self.referring_physician.split("^"),
            self.accession_number,
        )


FAKE_IDENTITY = Identity(name="Planted^Jane^Quincy", birth_date="19010203", patient_id="MRN-PLANTED-4711")


def _dataset(rows: int, columns: int, identity: Identity, view: str | None, transfer_syntax: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DIGITAL_XRAY
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DIGITAL_XRAY
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.PatientName = identity.name
    ds.PatientBirthDate = identity.birth_date
    ds.PatientID = identity.patient_id
    ds.InstitutionName = identity.institution
    ds.ReferringPhysicianName = identity.referring_physician
    ds.AccessionNumber = identity.accession_number
    ds.StudyDescription = "PLANTED TEST STUDY"
    if view:
        ds.ViewPosition = view
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    return ds


def _save(ds) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def jpeg_dicom(
    jpeg: bytes, identity: Identity = FAKE_IDENTITY, view: str | None = "PA", photometric: str = "MONOCHROME2"
) -> bytes:
    """The JPEG's bytes unchanged, as JPEG-baseline encapsulated pixel data (an 8-bit grayscale JPEG)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    with Image.open(io.BytesIO(jpeg)) as image:
        width, height = image.size
        if image.mode != "L":
            raise ValueError(f"jpeg_dicom wraps grayscale JPEGs; this one is {image.mode}")
    ds = _dataset(height, width, identity, view, JPEGBaseline8Bit)
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression = "01"
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    return _save(ds)


def native_dicom(
    pixels: np.ndarray,
    bits_stored: int,
    identity: Identity = FAKE_IDENTITY,
    view: str | None = "PA",
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
) -> bytes:
    """Uncompressed little-endian DICOM of a 2-D integer array.

    ``window`` is (center, width) in modality units, ``rescale`` (slope, intercept).
    """
    from pydicom.uid import ExplicitVRLittleEndian

    if pixels.ndim != 2 or not np.issubdtype(pixels.dtype, np.integer):
        raise ValueError("native_dicom takes a 2-D integer array")
    signed = np.issubdtype(pixels.dtype, np.signedinteger)
    allocated = 8 if bits_stored <= 8 else 16
    dtype = np.dtype(f"{'i' if signed else 'u'}{allocated // 8}").newbyteorder("<")
    ds = _dataset(pixels.shape[0], pixels.shape[1], identity, view, ExplicitVRLittleEndian)
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = f"{rescale[0]:g}", f"{rescale[1]:g}"
    ds.PixelData = np.ascontiguousarray(pixels.astype(dtype)).tobytes()
    ds["PixelData"].VR = "OW" if allocated == 16 else "OB"
    return _save(ds)


def gray_pixels(jpeg: bytes) -> np.ndarray:
    """The full-resolution 8-bit pixels of a grayscale image file."""
    with Image.open(io.BytesIO(jpeg)) as image:
        return np.asarray(image.convert("L"))


def twelve_bit_with_window(jpeg: bytes, **kwargs) -> bytes:
    """12-bit stored values 16*v with the window that maps them back to v exactly (LINEAR, PS3.3 C.11.2.1.2)."""
    pixels = gray_pixels(jpeg).astype(np.uint16) * 16
    return native_dicom(pixels, 12, window=(2040.5, 4081), **kwargs)


def convert_tree(src: Path, out: Path) -> int:
    """Every ``.jpeg`` under ``src`` as a JPEG-baseline ``.dcm`` (same relative path), planted identity."""
    count = 0
    for path in sorted(src.rglob("*.jpeg")):
        target = out / path.relative_to(src).with_suffix(".dcm")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(jpeg_dicom(path.read_bytes()))
        count += 1
    return count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cxr_pipeline.datasets.dicom_from_images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--src", required=True, help="chest_xray tree of grayscale JPEGs")
    parser.add_argument("--out", required=True, help="where to write the DICOM tree")
    add_config_options(parser, spark=False, verbose=False)
    return parser


def _convert(job: Job) -> int:
    n = convert_tree(Path(job.args.src), Path(job.args.out))
    print(f"wrote {n} DICOM files under {job.args.out} (planted fake identity: {FAKE_IDENTITY.patient_id})")
    return 0


COMMAND = Command("dicom_from_images", build_parser, _convert)


def main(argv=None) -> int:
    return run(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
