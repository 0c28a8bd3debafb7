"""DICOM decoding, rejections and de-identification, on DICOM files made from the real sample X-rays
(``datasets.dicom_from_images``) and on the real DICOM test files pydicom ships. No Spark here
except the last tests (reader and packing outputs scanned for the planted identity)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_pipeline.datasets.dicom_from_images import (
    FAKE_IDENTITY,
    gray_pixels,
    jpeg_dicom,
    native_dicom,
    twelve_bit_with_window,
)
from cxr_pipeline.images import dicom
from cxr_pipeline.images.decode import ImageDecodeError, decode_batch, decode_image, image_info

SIZE = (299, 299)


def pydicom_file(name: str) -> bytes:
    import pydicom

    return (Path(pydicom.__file__).parent / "data" / "test_files" / name).read_bytes()


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def assert_no_planted_values(text: str) -> None:
    for value in FAKE_IDENTITY.values():
        assert value.lower() not in text.lower(), f"planted identifying value {value!r} leaked"


@pytest.fixture(scope="module")
def xrays(sample_tree) -> dict[str, bytes]:
    """Two real sample X-rays per class (original JPEG bytes)."""
    picked = {}
    for label in ("NORMAL", "PNEUMONIA"):
        for path in sorted((sample_tree / "train" / label).glob("*.jpeg"))[:2]:
            picked[path.name] = path.read_bytes()
    return picked


@pytest.fixture(scope="module")
def one_xray(xrays) -> bytes:
    return next(iter(xrays.values()))


# ---------------------------------------------------------------- same pixels as the JPEG


def test_jpeg_wrapped_as_dicom_decodes_to_identical_pixels(xrays):
    for name, jpeg in xrays.items():
        wrapped = jpeg_dicom(jpeg)
        assert np.array_equal(decode_image(wrapped, SIZE), decode_image(jpeg, SIZE)), name
        width, height, _ = image_info(jpeg)
        assert image_info(wrapped) == (width, height, "DICOM")


def test_twelve_bit_with_window_tags_gives_the_full_resolution_pixels(one_xray):
    # 16*v stored in 12 bits, window 2040.5/4081 (LINEAR) maps back to v exactly.
    pixels = gray_pixels(one_xray)
    assert np.array_equal(decode_image(twelve_bit_with_window(one_xray), SIZE), decode_image(png(pixels), SIZE))
    # The JPEG path decodes in draft mode (reduced scale): same picture, within the draft-mode bound of test_imaging.
    difference = np.abs(decode_image(one_xray, SIZE).astype(int) - decode_image(png(pixels), SIZE)).mean()
    assert difference < 3.0


def test_window_is_applied_after_the_rescale(one_xray):
    pixels = gray_pixels(one_xray)
    # value = 2*stored - 100; the window in those units maps 16*v back to v.
    data = native_dicom(pixels.astype(np.uint16) * 16, 12, rescale=(2, -100), window=(3980.5, 8161))
    assert np.array_equal(decode_image(data, SIZE), decode_image(png(pixels), SIZE))


def test_percentile_window_ignores_a_linear_rescale_and_monochrome1_inverts(one_xray):
    stored = gray_pixels(one_xray).astype(np.uint16) * 257
    plain = decode_image(native_dicom(stored, 16), SIZE).astype(int)
    rescaled = decode_image(native_dicom(stored, 16, rescale=(0.5, -1000)), SIZE).astype(int)
    inverted = decode_image(native_dicom(stored, 16, photometric="MONOCHROME1"), SIZE).astype(int)
    assert np.array_equal(plain, rescaled)
    assert np.abs((255 - plain) - inverted).max() <= 1  # rounding of 255*(1-y) vs 255-255*y
    # the robust window stretches the 0.5..99.5 % range to 0..255: both ends are reached
    assert plain.min() == 0 and plain.max() == 255
    signed = decode_image(native_dicom(stored.astype(np.int32).astype(np.int16) // 16 - 2048, 12), SIZE)
    assert signed.shape == SIZE + (3,)


@pytest.fixture(scope="module")
def backbone():
    from cxr_pipeline.models.backbones import build_backbone

    return build_backbone("InceptionV3", feature_layer="mixed5")


def test_features_of_jpeg_and_dicom_agree(one_xray, backbone):
    """Same pixels -> same features, within the float32 kernel tolerance of tests/tolerances.py.

    The JPEG-wrapped DICOM decodes to the JPEG's very pixels; the 12-bit DICOM to the PNG of the full
    decode (the .jpeg itself is decoded in draft mode, which is the JPEG path's own approximation).
    """
    from tolerances import assert_same_features

    from cxr_pipeline.models.backbones import featurize_arrays

    full = png(gray_pixels(one_xray))
    batch = np.stack(
        [decode_image(d, SIZE) for d in (one_xray, jpeg_dicom(one_xray), full, twelve_bit_with_window(one_xray))]
    )
    features = featurize_arrays(backbone, "InceptionV3", batch)
    assert_same_features(features[1], features[0])
    assert_same_features(features[3], features[2])


def test_voi_functions_follow_the_standard():
    # PS3.3 C.11.2.1.2.1 LINEAR: 0 for x <= c - 0.5 - (w-1)/2, 1 for x > c - 0.5 + (w-1)/2,
    # else ((x - (c-0.5))/(w-1) + 0.5)
    x = np.array([94.5, 95.0, 100.0, 105.5, 106.0])
    assert np.allclose(dicom._window(x, 100, 11, "LINEAR"), [0.0, 0.05, 0.55, 1.0, 1.0])
    # C.11.2.1.3.2 LINEAR_EXACT: (x - c)/w + 0.5 ; C.11.2.1.3.1 SIGMOID: 1 / (1 + exp(-4 (x - c) / w))
    assert np.allclose(dicom._window(np.array([95.0, 100.0, 105.0]), 100, 10, "LINEAR_EXACT"), [0.0, 0.5, 1.0])
    assert np.allclose(dicom._window(np.array([100.0, 110.0]), 100, 10, "SIGMOID"), [0.5, 1 / (1 + np.exp(-4))])


# ---------------------------------------------------------------- real DICOM files shipped with pydicom


def test_one_image_in_five_transfer_syntaxes_decodes_the_same():
    # native little/big endian, RLE (pydicom), JPEG 2000 lossless and JPEG-LS lossless (python-gdcm)
    names = [
        "MR_small.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ]
    decoded = [decode_image(pydicom_file(n), (64, 64)) for n in names]
    for name, image in zip(names[1:], decoded[1:]):
        assert np.array_equal(image, decoded[0]), name
    assert decoded[0].std() > 10


def test_jpeg_lossless_colour_matches_its_uncompressed_twin():
    lossless = decode_image(pydicom_file("SC_rgb_jpeg_gdcm.dcm"), (100, 100))  # JPEG process 14, python-gdcm
    native = decode_image(pydicom_file("SC_rgb_rle.dcm"), (100, 100))
    assert np.array_equal(lossless, native)


def test_rescaled_ct_decodes():
    assert decode_image(pydicom_file("CT_small.dcm"), (64, 64)).std() > 10


@pytest.mark.parametrize(
    "name, reason",
    [
        ("reportsi.dcm", "DICOM without an image (Basic Text SR Storage)"),
        ("rtplan.dcm", "DICOM without an image (RT Plan Storage)"),
        ("examples_ybr_color.dcm", "multi-frame DICOM (30 frames)"),
        ("MR_truncated.dcm", "corrupt DICOM pixel data"),
        ("examples_palette.dcm", "unsupported DICOM photometric interpretation PALETTE COLOR"),
        ("JPGExtended.dcm", "no decoder for DICOM transfer syntax JPEG Extended"),
        ("rtdose_1frame.dcm", "wider than 16 bits"),
        ("badVR.dcm", "corrupt DICOM header"),
    ],
)
def test_unusable_dicom_is_a_recorded_rejection(name, reason):
    data = pydicom_file(name)
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, (32, 32))
    assert reason in str(caught.value)
    arrays, good, failed = decode_batch([data], (32, 32))
    assert good == [] and reason in failed[0][1]


PLANTED = "AUDITTRAP"  # a header string no rejection may repeat
PRIVATE_UID = "1.2.826.0.1.3680043.10.4711.424242"  # a private UID: in no DICOM dictionary


def edited(data: bytes, **changes) -> bytes:
    """``data`` with header elements set (``TransferSyntaxUID`` in the file meta), or deleted with ``None``."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    for name, value in changes.items():
        target = ds.file_meta if name == "TransferSyntaxUID" else ds
        if value is None:
            delattr(target, name)
        else:
            setattr(target, name, value)
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=False, little_endian=True)  # required for a private transfer syntax
    return out.getvalue()


@pytest.mark.parametrize(
    "encoding, changes, reason",
    [
        (
            "native",
            {"PhotometricInterpretation": PLANTED},
            "unsupported DICOM photometric interpretation (not a term of the standard)",
        ),
        (
            "jpeg",
            {"PhotometricInterpretation": PLANTED},
            "unsupported DICOM photometric interpretation (not a term of the standard)",
        ),
        (
            "jpeg",
            {"TransferSyntaxUID": "1.2.840.10008.1.2.4.100"},
            "no decoder for DICOM transfer syntax MPEG2 Main Profile / Main Level",
        ),
        ("jpeg", {"TransferSyntaxUID": PRIVATE_UID}, "no decoder for an unknown DICOM transfer syntax"),
        ("native", {"TransferSyntaxUID": PRIVATE_UID}, "no decoder for an unknown DICOM transfer syntax"),
        ("native", {"Rows": None, "SOPClassUID": PRIVATE_UID}, "DICOM without an image (an unknown SOP class)"),
    ],
)
def test_rejections_name_the_standard_never_a_header_string(one_xray, changes, reason, encoding):
    """A reason names the DICOM dictionary's term for a UID or a photometric interpretation, or says it is unknown:
    the header's own string (here a planted word, or a UID) is never repeated, and pydicom's text is not passed on."""
    base = jpeg_dicom(one_xray) if encoding == "jpeg" else native_dicom(gray_pixels(one_xray)[:64, :64], 8)
    data = edited(base, **changes)
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, (32, 32))
    _, good, failed = decode_batch([data], (32, 32))
    assert str(caught.value) == reason and good == [] and failed[0][1] == reason
    for value in changes.values():
        assert value is None or str(value) not in reason


def test_facts_keep_a_known_view_term_only(one_xray):
    assert dicom.read_facts(jpeg_dicom(one_xray, view="LL"), "k").view_position == "LL"
    assert dicom.read_facts(jpeg_dicom(one_xray, view=PLANTED), "k").view_position == dicom.OTHER_VIEW


def test_missing_or_truncated_pixel_data_is_a_rejection(one_xray):
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(native_dicom(gray_pixels(one_xray)[:64, :64], 8)))
    del ds.PixelData
    out = io.BytesIO()
    ds.save_as(out)
    with pytest.raises(ImageDecodeError, match="DICOM without pixel data"):
        decode_image(out.getvalue(), (32, 32))
    truncated = jpeg_dicom(one_xray)
    with pytest.raises(ImageDecodeError, match="DICOM without pixel data"):
        decode_image(truncated[: len(truncated) // 2], (32, 32))


def test_pixel_guard_applies_before_decompressing(one_xray):
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(jpeg_dicom(one_xray)))
    ds.Rows, ds.Columns = 20_000, 20_000  # header of a decompression bomb; the frame is never opened
    out = io.BytesIO()
    ds.save_as(out)
    with pytest.raises(ImageDecodeError, match=r"too many pixels \(20000x20000 = 400000000 > max_pixels 60000000\)"):
        decode_image(out.getvalue(), SIZE)
    with pytest.raises(ImageDecodeError, match="too many pixels"):
        image_info(out.getvalue())


def test_out_of_memory_while_decoding_dicom_propagates(monkeypatch):
    import pydicom.pixels

    def no_memory(*args, **kwargs):
        raise MemoryError("simulated")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", no_memory)
    with pytest.raises(MemoryError):
        decode_image(pydicom_file("MR_small.dcm"), (32, 32))


# ---------------------------------------------------------------- no patient data out


def test_facts_carry_a_keyed_pseudonym_and_the_view_never_the_raw_id(one_xray):
    data = jpeg_dicom(one_xray, view="LATERAL")
    facts = dicom.read_facts(data, "site-secret")
    assert facts.view_position == "LATERAL" and facts.modality == "DX"
    assert facts.patient == dicom.patient_pseudonym(FAKE_IDENTITY.patient_id, "site-secret")
    assert facts.patient != dicom.read_facts(data, "another-key").patient
    assert facts.patient.startswith("pt-") and "." not in facts.patient
    assert_no_planted_values(repr(facts))
    assert not dicom.is_frontal("LATERAL") and dicom.is_frontal("pa") and dicom.is_frontal("AP")


def test_pseudonym_is_its_own_patient_for_the_split(one_xray):
    from cxr_pipeline.images.layout import patient_id

    pseudonym = dicom.patient_pseudonym(FAKE_IDENTITY.patient_id, "k")
    assert patient_id(pseudonym) == pseudonym


def test_settings_come_from_the_config():
    from cxr_pipeline import config

    settings = dicom.DicomSettings.from_config(config.load_config(overrides=["dicom.frontal_only=true"]))
    assert settings.frontal_only is True and settings.patient_key
    with pytest.raises(ValueError, match="patient_key"):
        dicom.DicomSettings.from_config({"dicom": {"patient_key": "", "frontal_only": False, "packed_png_bits": 8}})
    sixteen = dicom.DicomSettings.from_config(config.load_config(overrides=["dicom.packed_png_bits=16"]))
    assert sixteen.packed_png_bits == 16
    with pytest.raises(ValueError, match="packed_png_bits must be 8 or 16"):
        dicom.DicomSettings.from_config(config.load_config(overrides=["dicom.packed_png_bits=12"]))


def test_no_warning_or_log_quotes_header_values(one_xray, caplog, recwarn):
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(jpeg_dicom(one_xray)))
    ds.PatientBirthDate = FAKE_IDENTITY.birth_date + "-not-a-date"  # invalid DA: pydicom would warn, quoting it
    out = io.BytesIO()
    ds.save_as(out)
    with caplog.at_level("DEBUG"):
        dicom.read_facts(out.getvalue(), "k")
        decode_image(out.getvalue(), (32, 32))
    assert_no_planted_values(caplog.text + " ".join(str(w.message) for w in recwarn))


# ------------------------------------------------------- Spark reader and packed table: nothing identifying out

KEY = "test-site-key"


def site(frontal_only: bool) -> dicom.DicomSettings:
    return dicom.DicomSettings(KEY, frontal_only=frontal_only, packed_png_bits=8)


@pytest.fixture(scope="module")
def dicom_tree(tmp_path_factory, sample_tree) -> Path:
    """A small chest_xray tree of DICOM files made from the sample X-rays, planted identity in each."""
    root = tmp_path_factory.mktemp("dicom") / "chest_xray"
    normal = sorted((sample_tree / "train" / "NORMAL").glob("*.jpeg"))
    pneumonia = sorted((sample_tree / "train" / "PNEUMONIA").glob("*.jpeg"))
    files = {
        "train/NORMAL/a.dcm": jpeg_dicom(normal[0].read_bytes(), view="PA"),
        "train/NORMAL/b.dcm": jpeg_dicom(normal[1].read_bytes(), view="LATERAL"),
        "train/NORMAL/" + normal[2].name: normal[2].read_bytes(),
        "train/PNEUMONIA/c.dcm": twelve_bit_with_window(
            pneumonia[0].read_bytes(), view="AP", photometric="MONOCHROME2"
        ),
        "train/PNEUMONIA/d.dcm": native_dicom(
            gray_pixels(pneumonia[1].read_bytes()).astype(np.uint16) * 257, 16, photometric="MONOCHROME1", view=None
        ),
        "train/PNEUMONIA/multi.dcm": pydicom_file("examples_ybr_color.dcm"),
        "train/PNEUMONIA/report.dcm": pydicom_file("reportsi.dcm"),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def strings_of(df, skip=("content",)) -> str:
    columns = [c for c in df.columns if c not in skip]
    return "\n".join(" ".join(str(v) for v in row) for row in df.select(*columns).collect())


def test_reader_gives_pseudonymous_patients_and_keeps_frontal_views(spark, dicom_tree):
    from cxr_pipeline.spark.reader import read_images_with_rejections

    read = read_images_with_rejections(spark, str(dicom_tree), dicom=site(frontal_only=True))
    patient_rows = read.patients.collect()
    rejected_rows = read.rejected.collect()
    image_rows = read.images.drop("content").collect()
    patients = {Path(r["path"]).name: (r["patient"], r["view_position"]) for r in patient_rows}
    pseudonym = dicom.patient_pseudonym(FAKE_IDENTITY.patient_id, KEY)
    assert patients["a.dcm"] == (pseudonym, "PA") and patients["c.dcm"] == (pseudonym, "AP")
    assert patients["d.dcm"] == (pseudonym, None)  # no ViewPosition: kept
    jpeg_name = next(n for n in patients if n.endswith(".jpeg"))
    assert patients[jpeg_name] == (jpeg_name.rsplit("-", 1)[0], None)  # the file-name patient, as before
    assert "b.dcm" not in patients and "b.dcm" not in {Path(r["path"]).name for r in image_rows}
    rejected = {Path(r["path"]).name: r["reason"] for r in rejected_rows}
    assert rejected["b.dcm"] == "view LATERAL is not frontal (dicom.frontal_only)"
    assert_no_planted_values("\n".join(" ".join(map(str, r)) for r in patient_rows + rejected_rows + image_rows))


def test_packed_dicom_table_holds_decoded_images_and_no_patient_data(spark, dicom_tree, tmp_path):
    from cxr_pipeline.spark.packing import pack_image_tree
    from cxr_pipeline.spark.reader import read_images_with_rejections

    out = tmp_path / "packed.parquet"
    summary = pack_image_tree(spark, str(dicom_tree), str(out), dicom=site(frontal_only=False))
    assert summary.images == 5 and summary.rejected == 2
    # every byte written (parquet, _rejected, _duplicates, Spark's own files)...
    for path in out.rglob("*"):
        if path.is_file():
            assert_no_planted_values(path.read_bytes().decode("latin-1"))
    table = spark.read.parquet(str(out))
    # ...and every value read back (Parquet pages are compressed), reasons included
    assert_no_planted_values(strings_of(table))
    rows = {Path(r["path"]).name: r for r in table.collect()}
    assert rows["a.dcm"]["format"] == "JPEG" and rows["c.dcm"]["format"] == "PNG"
    assert {rows[n]["source_format"] for n in ("a.dcm", "b.dcm", "c.dcm", "d.dcm")} == {"DICOM"}
    for name in ("a.dcm", "c.dcm", "d.dcm"):
        content = bytes(rows[name]["content"])
        assert b"DICM" not in content[:200]
        assert np.array_equal(
            decode_image(content, SIZE),
            decode_image((dicom_tree / "train" / rows[name]["label_name"] / name).read_bytes(), SIZE),
        ), name
    rejected = spark.read.option("header", True).csv(str(out / "_rejected"))
    reasons = {Path(r["path"]).name: r["reason"] for r in rejected.collect()}
    assert reasons["multi.dcm"].startswith("multi-frame DICOM") and reasons["report.dcm"].startswith(
        "DICOM without an image"
    )
    again = read_images_with_rejections(spark, str(out), source="parquet", dicom=site(frontal_only=True))
    assert {Path(r["path"]).name for r in again.rejected.collect()} == {"b.dcm"}
    assert {r["patient"] for r in again.patients.collect() if r["path"].endswith(".dcm")} == {
        dicom.patient_pseudonym(FAKE_IDENTITY.patient_id, KEY)
    }


def test_service_checks_accept_dicom_and_never_send_its_header_back(one_xray):
    from cxr_pipeline.serving.validation import UploadRejected, browser_image, check_upload

    # A real MONOCHROME1 file: stored values are inverted (high = dark); displayed, it is the JPEG again.
    data = native_dicom(
        4080 - gray_pixels(one_xray).astype(np.uint16) * 16, 12, photometric="MONOCHROME1", window=(2040.5, 4081)
    )
    assert np.array_equal(decode_image(data, SIZE), decode_image(png(gray_pixels(one_xray)), SIZE))
    checked = check_upload(data, 64 << 20, SIZE)
    assert (checked.format, checked.width, checked.height) == ("dicom",) + image_info(one_xray)[:2]
    shown, mime = browser_image(data, checked, max_side=256)
    assert mime == "image/png" and b"DICM" not in shown
    assert_no_planted_values(shown.decode("latin-1") + repr(checked))
    picture = np.asarray(Image.open(io.BytesIO(shown)).convert("L"), dtype=float)
    # shown as displayed: the same picture as the JPEG, not its negative
    reference = np.asarray(Image.open(io.BytesIO(one_xray)).convert("L").resize(picture.shape[::-1]), dtype=float)
    assert np.corrcoef(picture.ravel(), reference.ravel())[0, 1] > 0.99
    with pytest.raises(UploadRejected) as caught:
        check_upload(pydicom_file("examples_ybr_color.dcm"), 64 << 20, SIZE)
    assert caught.value.status_code == 422 and "multi-frame DICOM" in caught.value.message


def test_an_unexpected_error_in_a_dicom_is_a_rejection_without_its_message(monkeypatch, one_xray):
    def odd_lut(*args, **kwargs):
        raise KeyError(FAKE_IDENTITY.name)  # as if a message quoted a header value

    monkeypatch.setattr(dicom, "gray_table", odd_lut)
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(jpeg_dicom(one_xray), SIZE)
    assert str(caught.value) == "corrupt DICOM (KeyError)"


# ---------------------------------------------------------------- the CNN job carves by the header's patient too


def one_patient_pairs_tree(root: Path) -> dict[str, list[str]]:
    """Tiny DICOM files; two of each class belong to one patient under two different file-name patterns."""
    from cxr_pipeline.datasets.dicom_from_images import Identity

    files = {
        "NORMAL": {"IM-0101-0001.dcm": "MRN-N1", "NORMAL2-IM-0202-0001.dcm": "MRN-N1"},
        "PNEUMONIA": {"person101_bacteria_1.dcm": "MRN-P1", "person202_virus_2.dcm": "MRN-P1"},
    }
    for i in range(2, 8):
        files["NORMAL"][f"IM-03{i:02d}-0001.dcm"] = f"MRN-N{i}"
        files["PNEUMONIA"][f"person3{i:02d}_bacteria_{i}.dcm"] = f"MRN-P{i}"
    pixels = np.zeros((8, 8), dtype=np.uint8)
    for label, names in files.items():
        (root / "train" / label).mkdir(parents=True)
        for name, patient in names.items():
            data = native_dicom(pixels, 8, identity=Identity("Planted^Pair", "19010203", patient))
            (root / "train" / label / name).write_bytes(data)
    return {
        "NORMAL": ["IM-0101-0001.dcm", "NORMAL2-IM-0202-0001.dcm"],
        "PNEUMONIA": ["person101_bacteria_1.dcm", "person202_virus_2.dcm"],
    }


def test_cnn_carve_groups_dicom_files_by_their_header_patient_like_the_spark_job(spark, tmp_path):
    from cxr_pipeline import config
    from cxr_pipeline.cnn import data
    from cxr_pipeline.images import splits
    from cxr_pipeline.spark.classifier.training import TrainingSettings, assign_subsets

    pairs = one_patient_pairs_tree(tmp_path / "tree")
    fraction, seed = 0.5, 42
    records, _ = data.list_image_tree(str(tmp_path / "tree"), patient_key=KEY)
    names = [r.file_name for r in records]
    by_name = dict(zip(names, splits.is_validation(names, [r.label for r in records], fraction, seed)))
    assert any(by_name[a] != by_name[b] for a, b in pairs.values())  # file names alone would split a patient

    train, val, _ = data.split_records(records, "carve", fraction, seed)
    cnn_val = {r.file_name for r in val}
    assert val and train
    for a, b in pairs.values():
        assert (a in cnn_val) == (b in cnn_val), (a, b)
    patients = {dicom.patient_pseudonym(f"MRN-{c}{i}", KEY) for c in "NP" for i in range(1, 8)}
    assert {r.patient for r in records} == patients

    # the Spark job's carve (training.assign_subsets with the reader's patients column) picks the same images
    settings = TrainingSettings.from_config(
        config.load_config(
            overrides=["training.validation=carve", f"training.validation_fraction={fraction}", f"training.seed={seed}"]
        )
    )
    features = spark.createDataFrame(
        [(r.uri, r.split, r.label) for r in records], "path string, split string, label int"
    )
    assigned, _ = assign_subsets(features, settings, {r.uri: r.patient for r in records})
    spark_val = {Path(r["path"]).name for r in assigned.where("subset = 'val'").collect()}
    assert spark_val == cnn_val

    # a packed table's patient column gives the same carve
    table = tmp_path / "table" / "split=train"
    table.mkdir(parents=True)
    import pandas as pd

    pd.DataFrame(
        {"path": [r.uri for r in records], "patient": [r.patient for r in records], "content": [b""] * len(records)}
    ).to_parquet(table / "part-0.parquet")
    from_table = data.load_splits(str(tmp_path / "table"), "carve", fraction, seed)
    assert {r.file_name for r in from_table.val} == cnn_val


# ---------------------------------------------------------------- packing as a 16-bit PNG


def test_sixteen_bit_packed_png_decodes_like_the_dicom(one_xray, backbone):
    """dicom.packed_png_bits=16: the display values at 16 bits, decoded (scaled by 255/65535, not stretched to the
    image's own min..max) to the very pixels and features the DICOM gives. The wide window leaves the image
    in the middle grays: a stretched 16-bit PNG would come out with more contrast than the DICOM."""
    from tolerances import assert_same_features

    from cxr_pipeline.models.backbones import featurize_arrays
    from cxr_pipeline.spark.packing import _pack_row

    pixels = gray_pixels(one_xray)
    sources = [
        twelve_bit_with_window(one_xray),
        native_dicom(pixels.astype(np.uint16) * 16, 12, window=(2040.5, 8161)),  # display 0.25..0.75
        native_dicom(pixels.astype(np.uint16) * 257, 16, photometric="MONOCHROME1"),
    ]  # percentile window
    packed = []
    for data in sources:
        width, height, fmt, reason, payload, patient, view, source_format = _pack_row(
            "/t/train/NORMAL/x.dcm", data, 60_000_000, KEY, 16
        )
        with Image.open(io.BytesIO(payload)) as image:
            assert (fmt, image.format, image.mode, image.size) == ("PNG", "PNG", "I;16", (width, height))
            assert int(np.asarray(image).max()) > 255  # 16-bit values, not 8-bit ones in a 16-bit file
        pseudonym = dicom.patient_pseudonym(FAKE_IDENTITY.patient_id, KEY)
        assert (reason, source_format, patient) == (None, "DICOM", pseudonym)
        assert_no_planted_values(payload.decode("latin-1"))
        packed.append(payload)
    from_dicom = np.stack([decode_image(d, SIZE) for d in sources])
    from_png = np.stack([decode_image(p, SIZE) for p in packed])
    # exact on these images; in general a value may land on the neighbouring level where the display value
    # is within 0.002 of x.5 (rounding 65535ths, then 255ths), hence features compared at the kernel tolerance
    assert np.abs(from_png.astype(int) - from_dicom).max() <= 1
    assert np.array_equal(from_png[1], from_dicom[1])
    features = featurize_arrays(backbone, "InceptionV3", np.concatenate([from_dicom, from_png]))
    assert_same_features(features[3:], features[:3])
    # the embedded JPEG with the identity display table is still stored as that JPEG, whatever the bit depth
    assert dicom.pack_payload(jpeg_dicom(one_xray), 60_000_000, 16)[1] == "JPEG"
    with pytest.raises(ValueError, match="png_bits must be 8 or 16"):
        dicom.pack_payload(sources[0], 60_000_000, 12)


def test_dicom_does_not_import_the_image_decoder_that_calls_it():
    # imaging calls dicom for DICOM bytes; dicom takes the shared pieces from pillow_io, so there is no circle.
    import ast

    for module in (dicom, __import__("cxr_pipeline.images.pillow_io", fromlist=["x"])):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {
            node.module if isinstance(node, ast.ImportFrom) else alias.name
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
        }
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
        assert not any(m and m.split(".")[-1] == "imaging" for m in imported), module.__name__
        assert "imaging" not in names, module.__name__
