#!/usr/bin/env python
"""Decode throughput (JPEG vs the same X-rays as DICOM) and peak decode memory. Prints figures, asserts nothing.

Throughput: the sample X-rays decoded to 299x299 by ``imaging.decode_image``, one process, as
    JPEG file | JPEG baseline in DICOM (bytes unchanged) | uncompressed 12-bit DICOM with a window |
    JPEG 2000 lossless 12-bit DICOM (python-gdcm) | RLE lossless 12-bit DICOM (pydicom)
with images/s and the ratio to JPEG, all measured in this one run (the machines are shared).

Memory (--memory): each case is decoded in a fresh child process; its peak RSS (Linux VmHWM, reset
through /proc/self/clear_refs just before the decode) above the RSS at that moment is reported, in MB
and bytes per source pixel (the input bytes, already read, are not counted).
Cases: a WxH 16-bit PNG (the issue-10 probe: 7700x7700) with today's decoder and with the decoder
before the fix (whole-image float64 window, loaded from git), and the same pixels as 16-bit DICOM.

    PYTHONPATH=lib .venv/bin/python bench/bench_decode.py [--repeats 3] [--memory] [--side 7700]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

from cxr_pipeline import paths  # noqa: E402
from cxr_pipeline.datasets.dicom_from_images import (  # noqa: E402
    FAKE_IDENTITY,
    _dataset,
    _save,
    gray_pixels,
    jpeg_dicom,
    twelve_bit_with_window,
)
from cxr_pipeline.images.decode import decode_image  # noqa: E402

BEFORE_FIX = "827de81~1"  # the commit before the strip-wise window


def encapsulated_12bit(pixels16: np.ndarray, transfer_syntax: str, frame: bytes) -> bytes:
    from pydicom.encaps import encapsulate

    ds = _dataset(pixels16.shape[0], pixels16.shape[1], FAKE_IDENTITY, "PA", transfer_syntax)
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = "2040.5", "4081"
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return _save(ds)


def j2k_dicom(jpeg: bytes) -> bytes:
    from pydicom.uid import JPEG2000Lossless

    pixels = gray_pixels(jpeg).astype(np.uint16) * 16
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG2000", no_jp2=True, irreversible=False)  # lossless codestream
    return encapsulated_12bit(pixels, JPEG2000Lossless, out.getvalue())


def rle_dicom(jpeg: bytes) -> bytes:
    import pydicom
    from pydicom.uid import RLELossless

    ds = pydicom.dcmread(io.BytesIO(twelve_bit_with_window(jpeg)))
    ds.compress(RLELossless, encoding_plugin="pydicom")
    return _save(ds)


def cases(jpegs: list[bytes]) -> dict[str, list[bytes]]:
    return {
        "JPEG file": jpegs,
        "DICOM, JPEG baseline (same bytes)": [jpeg_dicom(j) for j in jpegs],
        "DICOM, uncompressed 12-bit + window": [twelve_bit_with_window(j) for j in jpegs],
        "DICOM, JPEG 2000 lossless 12-bit": [j2k_dicom(j) for j in jpegs],
        "DICOM, RLE lossless 12-bit": [rle_dicom(j) for j in jpegs],
    }


def throughput(repeats: int) -> None:
    jpegs = [p.read_bytes() for p in sorted(paths.SAMPLE_TREE.rglob("*.jpeg"))]
    if not jpegs:
        sys.exit(f"no sample X-rays under {paths.SAMPLE_TREE}: run `make sample-data`")
    prepared = cases(jpegs)
    for files in prepared.values():  # warm-up: imports, plugins
        decode_image(files[0])
    best: dict[str, float] = {name: float("inf") for name in prepared}
    for _ in range(repeats):  # alternate the cases so machine noise hits all of them
        for name, files in prepared.items():
            start = time.perf_counter()
            for data in files:
                decode_image(data)
            best[name] = min(best[name], time.perf_counter() - start)
    n = len(jpegs)
    base = n / best["JPEG file"]
    print(f"decode to 299x299, {n} sample X-rays (968x592 .. 1776x1416), best of {repeats}, one process")
    print(f"{'input':40s} {'MB':>7s} {'images/s':>9s} {'vs JPEG':>8s}")
    for name, files in prepared.items():
        rate = n / best[name]
        print(f"{name:40s} {sum(map(len, files)) / 1e6:7.1f} {rate:9.1f} {rate / base:7.2f}x")


# ---------------------------------------------------------------- peak memory, one child process per case

CHILD = r"""
import importlib.util, io, json, sys
sys.path.insert(0, {lib!r})
import numpy as np
from PIL import Image
which, path, before = sys.argv[1], sys.argv[2], sys.argv[3]
if which == "before":
    spec = importlib.util.spec_from_file_location("cxr_pipeline.imaging_before", before)
    imaging = importlib.util.module_from_spec(spec); spec.loader.exec_module(imaging)
else:
    from cxr_pipeline.images import decode as imaging
small = io.BytesIO(); Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)).save(small, "PNG")
imaging.decode_image(small.getvalue())
data = open(path, "rb").read()
if which == "dicom":
    imaging.decode_image(open({warm!r}, "rb").read())
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
baseline = status("VmRSS")
imaging.decode_image(data, max_pixels=10**9)
print(json.dumps({{"peak_above_baseline_kb": status("VmHWM") - baseline, "input_bytes": len(data)}}))
"""


def memory(side: int, workdir: Path) -> None:
    from pydicom.uid import ExplicitVRLittleEndian

    workdir.mkdir(parents=True, exist_ok=True)
    y, x = np.ogrid[:side, :side]
    pixels = ((x * 37 + y * 11) % 4096).astype(np.uint16) * 16  # smooth 12-bit-in-16 content
    png = workdir / f"wide_{side}.png"
    Image.fromarray(pixels).save(png, "PNG")
    ds = _dataset(side, side, FAKE_IDENTITY, "PA", ExplicitVRLittleEndian)
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    dcm = workdir / f"wide_{side}.dcm"
    dcm.write_bytes(_save(ds))
    warm = workdir / "warm.dcm"
    warm.write_bytes(_save(_small_dicom()))
    before = workdir / "imaging_before.py"
    before.write_text(
        subprocess.run(
            ["git", "show", f"{BEFORE_FIX}:lib/cxr_pipeline/imaging.py"],  # its path at that commit
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    script = CHILD.format(lib=str(REPO / "lib"), warm=str(warm))
    print(f"\npeak decode memory, {side}x{side} 16-bit ({side * side / 1e6:.0f} Mpx), RSS above a warmed baseline")
    print(f"{'case':52s} {'input MB':>9s} {'peak MB':>8s} {'B/px':>6s}")
    for label, which, path in [
        ("16-bit PNG, decoder before the fix (float64 window)", "before", png),
        ("16-bit PNG, strip-wise window", "now", png),
        ("16-bit DICOM, uncompressed, percentile window", "dicom", dcm),
    ]:
        out = subprocess.run(
            [sys.executable, "-c", script, which, str(path), str(before)], check=True, capture_output=True, text=True
        ).stdout
        figures = json.loads(out.strip().splitlines()[-1])
        peak = figures["peak_above_baseline_kb"] * 1024
        print(f"{label:52s} {figures['input_bytes'] / 1e6:9.1f} {peak / 1e6:8.0f} {peak / side / side:6.2f}")


def _small_dicom():
    from pydicom.uid import ExplicitVRLittleEndian

    ds = _dataset(64, 64, FAKE_IDENTITY, "PA", ExplicitVRLittleEndian)
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.arange(64 * 64, dtype=np.uint16).tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per case, alternating (default 3)")
    parser.add_argument("--memory", action="store_true", help="also measure peak decode memory (child processes)")
    parser.add_argument("--side", type=int, default=7700, help="side of the square 16-bit memory probe (default 7700)")
    parser.add_argument("--workdir", default="/tmp/cxr_bench_decode", help="where the memory probe files go")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args(argv)
    if not args.skip_throughput:
        throughput(args.repeats)
    if args.memory:
        memory(args.side, Path(args.workdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
