"""Each reader on fixtures in its exact layout, through the prepare step into the canonical layout."""

import json

import numpy as np
import pytest
from PIL import Image

from components.data.prepare import prepare_dataset
from components.data.readers import open_dataset
from tests.data_fixtures import write_cityscapes, write_folder, write_mapillary, write_voc


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    reader = open_dataset("cityscapes", write_cityscapes(tmp_path / "cs"))
    assert len(reader.classes.names) == 19 and reader.classes.names[0] == "road"
    manifest = prepare_dataset(reader, tmp_path / "out")
    sid = manifest["splits"]["train"][0]
    label = np.array(Image.open(tmp_path / "out" / "labels" / "train" / f"{sid}.png"))
    assert label[-1, 0] == 0  # road (id 7) -> train id 0
    assert label[0, 5] == 10  # sky (id 23) -> 10
    assert label[0, 0] == 255  # unlabeled -> ignored
    assert label[-1, -1] == 13  # car (id 26) -> 13
    assert set(manifest["splits"]) == {"train", "val"}
    assert manifest["class_frequencies"]["road"] > 0.4
    assert "pole" in manifest["classes"]["groups"]["thin_small"]
    assert len(manifest["checksums"]) == 8


def test_voc_keeps_boundary_as_ignore(tmp_path):
    reader = open_dataset("voc", write_voc(tmp_path / "voc"))
    assert len(reader.classes.names) == 21 and reader.classes.colors[1] == (128, 0, 0)
    manifest = prepare_dataset(reader, tmp_path / "out")
    assert manifest["splits"] == {"train": ["2007_000001", "2007_000002"], "val": ["2007_000003"]}
    label = np.array(Image.open(tmp_path / "out" / "labels" / "train" / "2007_000001.png"))
    assert label[0, 0] == 255 and label[5, 0] == 0 and label[5, 20] == 15


def test_mapillary_unlabeled_is_ignored(tmp_path):
    reader = open_dataset("mapillary", write_mapillary(tmp_path / "mv"))
    assert len(reader.classes.names) == 65 and "pole" in reader.classes.thin_small
    prepare_dataset(reader, tmp_path / "out")
    label = np.array(Image.open(tmp_path / "out" / "labels" / "val" / "validation0.png"))
    assert (label[0] == 255).all() and (label[1:] == 45).all()


def test_folder_reader_reads_class_list(tmp_path):
    reader = open_dataset("folder", write_folder(tmp_path / "f"))
    assert reader.classes.names == ["background", "wire", "field"]
    assert reader.classes.thin_small == ["wire"] and reader.classes.colors[1] == (255, 0, 0)
    manifest = prepare_dataset(reader, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest


def test_unknown_format_and_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="prepare.format: unknown format 'kitti'"):
        open_dataset("kitti", tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_dataset("voc", tmp_path / "nowhere")


@pytest.mark.parametrize(
    "lines, message",
    [
        (["road 128 64 128", "road 0 0 142"], r"classes.txt:2: class 'road' is listed twice \(first on line 1\)"),
        (["road 128 64 300"], r"classes.txt:1: colour \[128, 64, 300\] of 'road': components must be 0-255"),
        (["road -1 0 0"], r"classes.txt:1: colour \[-1, 0, 0\] of 'road': components must be 0-255"),
        (["road 12 x 4"], r"classes.txt:1: colour \['12', 'x', '4'\] of 'road': expected three whole numbers"),
        (["road 1 2 3 wide"], r"classes.txt:1: expected 'name \[r g b\] \[thin\]'"),
        ([f"class{i}" for i in range(256)], r"classes.txt lists 256 classes; at most 255 \(mask value 255 is the ign"),
        ([], r"classes.txt lists no classes"),
    ],
)
def test_a_bad_class_list_is_refused_naming_the_line(tmp_path, lines, message):
    """classes.txt used to be trusted: duplicate names, colour components that crashed `predict`
    later, and a 256th class that silently became the ignore label."""
    root = write_folder(tmp_path / "f")
    (root / "classes.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        open_dataset("folder", root)


def test_a_class_list_that_is_not_a_small_text_file_is_refused(tmp_path):
    import os

    root = write_folder(tmp_path / "f")
    (root / "classes.txt").unlink()
    os.mkfifo(root / "classes.txt")  # reading a FIFO would wait for a writer for ever
    with pytest.raises(ValueError, match=r"classes.txt: the class list .* is a FIFO \(named pipe\), not a regular"):
        open_dataset("folder", root)
    (root / "classes.txt").unlink()
    with open(root / "classes.txt", "wb") as handle:  # sparse: 2 GB declared, nothing stored
        handle.truncate(2 << 30)
    with pytest.raises(ValueError, match=r"classes.txt: the class list .* is 2147483648 bytes, more than the 1048576"):
        open_dataset("folder", root)
    (root / "classes.txt").write_bytes(b"road\n\xff\xfe\n")
    with pytest.raises(ValueError, match="classes.txt is not UTF-8 text"):
        open_dataset("folder", root)
    (root / "classes.txt").write_text("background\nwire thin\n")  # `name thin` without a colour
    assert open_dataset("folder", root).classes.thin_small == ["wire"]
