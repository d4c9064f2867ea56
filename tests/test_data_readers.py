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
