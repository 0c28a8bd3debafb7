import pytest

from cxr_pipeline.images.layout import (
    LayoutError,
    junk_reason,
    label_index,
    parse_image_path,
    patient_id,
    relative_image_path,
    sniff_image_format,
)


@pytest.mark.parametrize(
    "path",
    [
        "hdfs://127.0.0.1:9000/data/chest_xray/train/NORMAL/IM-0117-0001.jpeg",
        "file:///tmp/chest_xray/train/NORMAL/IM-0117-0001.jpeg",
        "/tmp/chest_xray/train/NORMAL/IM-0117-0001.jpeg",
        "s3a://bucket/chest_xray/train/NORMAL/IM-0117-0001.jpeg",
    ],
)
def test_parse_image_path_any_uri(path):
    parsed = parse_image_path(path)
    assert (parsed.split, parsed.label_name, parsed.file_name) == ("train", "NORMAL", "IM-0117-0001.jpeg")


@pytest.mark.parametrize("path", ["hdfs://nn/x.jpeg", "/data/chest_xray/NORMAL/x.jpeg", "/a/training/NORMAL/x.jpeg"])
def test_parse_image_path_rejects_wrong_layout(path):
    with pytest.raises(LayoutError):
        parse_image_path(path)


def test_label_index_is_sorted_and_distinct():
    # The seeds' bug: both classes labelled 1. Labels must differ and be stable.
    assert label_index(["PNEUMONIA", "NORMAL", "PNEUMONIA"]) == {"NORMAL": 0, "PNEUMONIA": 1}
    assert label_index(["c", "a", "b"]) == {"a": 0, "b": 1, "c": 2}
    with pytest.raises(LayoutError):
        label_index([])


@pytest.mark.parametrize(
    "name, patient",
    [
        ("person1946_bacteria_4874.jpeg", "person1946"),
        ("person1946_bacteria_4875.jpeg", "person1946"),
        ("person3_virus_15.jpeg", "person3"),
        ("IM-0117-0001.jpeg", "IM-0117"),
        ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
        ("NORMAL2-IM-1427-0002.jpeg", "NORMAL2-IM-1427"),
        ("synthetic_000012.jpeg", "synthetic_000012"),
    ],
)
def test_patient_id(name, patient):
    assert patient_id(name) == patient


def test_relative_image_path():
    assert (
        relative_image_path("hdfs://nn:9000/d/chest_xray/val/NORMAL/a.jpeg", "hdfs://nn:9000/d/chest_xray")
        == "val/NORMAL/a.jpeg"
    )
    with pytest.raises(LayoutError):
        relative_image_path("/elsewhere/a.jpeg", "/d/chest_xray")


def test_junk_reason():
    assert junk_reason(".DS_Store", 6148) == "hidden file"
    assert junk_reason("notes.txt", 10) == "not an image extension"
    assert junk_reason("a.jpeg", 0) == "zero-byte file"
    assert junk_reason("a.jpeg", 10, head=b"GIF89a") == "not an image (bad magic bytes)"
    assert junk_reason("a.jpeg", 10, head=b"\xff\xd8\xff\xe0") is None
    assert sniff_image_format(b"\x89PNG\r\n\x1a\nxxxx") == "png"
