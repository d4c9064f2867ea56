"""Generator determinism, pyramid round trip and the aligned multi-scale loader."""

import numpy as np
import pytest
import torch

from components.config import LoaderConfig
from components.data.classes import cityscapes_lookup
from components.data.dataset import PyramidEvalDataset, PyramidTrainDataset, class_uniform_order
from components.data.prepare import prepare_dataset
from components.data.pyramid import PyramidReader, build_pyramid, resize_image, resize_label
from components.data.readers import read_cityscapes
from components.data.synthetic import render_scene, write_cityscapes_layout
from components.storage import Storage

SCALES = [0.25, 0.5, 1.0, 2.0]


def test_generator_is_deterministic_and_uses_cityscapes_ids():
    a_img, a_lab = render_scene(7, "train", 3, 96, 160)
    b_img, b_lab = render_scene(7, "train", 3, 96, 160)
    c_img, _ = render_scene(7, "train", 4, 96, 160)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)
    assert (cityscapes_lookup()[a_lab] >= 0).all()  # every id is a Cityscapes label id
    ids = set(np.unique(a_lab).tolist())
    assert {7, 8, 23, 17} <= ids  # road, sidewalk, sky, pole


def test_generated_poles_are_thin():
    widths = []
    for i in range(6):
        _, label = render_scene(0, "train", i, 192, 384)
        rows = (label == 17).sum(axis=1)
        widths += rows[rows > 0].tolist()
    assert widths and np.median(widths) <= 3


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cityscapes_layout(root / "cs", {"train": 5, "val": 2}, 64, 96, seed=1)
    prepare_dataset(read_cityscapes(root / "cs"), root / "raw")
    build_pyramid(root / "raw", SCALES, shard_size=2, storage=Storage(), output=str(root / "pyramid"))
    return root


def test_pyramid_round_trip(pyramid):
    from PIL import Image

    reader = PyramidReader(str(pyramid / "pyramid"))
    assert reader.scales == SCALES and len(reader.entries("train")) == 5
    entry = reader.entries("train")[3]
    image = np.asarray(Image.open(pyramid / "raw" / "images" / "train" / f"{entry['id']}.png"))
    label = np.asarray(Image.open(pyramid / "raw" / "labels" / "train" / f"{entry['id']}.png"))
    levels = reader.read("train", 3, SCALES)
    assert np.array_equal(levels[1.0][0], image) and np.array_equal(levels[1.0][1], label)
    assert np.array_equal(levels[0.5][0], resize_image(image, (32, 48)))
    assert np.array_equal(levels[2.0][1], resize_label(label, (128, 192)))
    assert levels[0.25][0].shape == (16, 24, 3)
    with pytest.raises(KeyError, match=r"scales \[0.75\] are not in the pyramid"):
        reader.read("train", 0, [0.75])


def test_area_resize_averages():
    image = np.zeros((4, 4, 3), np.uint8)
    image[:2, :2] = 200
    assert resize_image(image, (2, 2))[0, 0, 0] == 200 and resize_image(image, (1, 1))[0, 0, 0] == 50


def test_train_crops_are_aligned_across_scales(pyramid):
    reader = PyramidReader(str(pyramid / "pyramid"))
    cfg = LoaderConfig(random_scales=[0.5, 1.0, 2.0], photometric_probability=0.0)
    ds = PyramidTrainDataset(reader, "train", [0.5, 1.0], (48, 64), cfg, seed=3)
    for index in range(len(ds)):
        item = ds[index]
        hi, lo = item["images"][1.0], item["images"][0.5]
        assert hi.shape == (3, 48, 64) and lo.shape == (3, 24, 32) and item["label"].shape == (48, 64)
        # The 0.5 crop shows the same region as the 1.0 crop: it matches its 2x2 average closely.
        pooled = torch.nn.functional.avg_pool2d(hi[None], 2)[0]
        assert (pooled - lo).abs().mean() < 0.35 * hi.std()


def test_eval_dataset_and_class_uniform_sampling(pyramid):
    reader = PyramidReader(str(pyramid / "pyramid"))
    ds = PyramidEvalDataset(reader, "val", [0.25, 0.75, 1.0])
    # 0.75 is not stored: it is made from the 1.0 level with the pyramid's own resize
    assert ds.scales == [0.25, 0.75, 1.0] and ds.stored == [0.25, 1.0]
    assert ds[0]["images"][1.0].shape == (3, 64, 96) and ds[0]["images"][0.75].shape == (3, 48, 72)
    entries = [{"classes": [0]}] * 9 + [{"classes": [0, 5]}]
    order = class_uniform_order(entries, 19, 1.0, np.random.default_rng(0))
    assert (order == 9).mean() > 0.3  # the only image with class 5 is drawn about half the time
    assert (class_uniform_order(entries, 19, 0.0, np.random.default_rng(0)) == np.arange(10)).all()


def test_loader_processes_and_pinned_memory_are_sized_from_the_machine():
    from components.config import LoaderConfig
    from components.data.dataset import loader_settings

    auto = LoaderConfig()
    assert loader_settings(auto, cpus=1)["num_workers"] == 0  # a loader process would take the only CPU
    assert loader_settings(auto, cpus=2) == {"num_workers": 1, "persistent_workers": True, "pin_memory": False}
    assert loader_settings(auto, cpus=16, device_type="cuda")["num_workers"] == 4
    assert loader_settings(auto, cpus=16, device_type="cuda")["pin_memory"] is True
    assert loader_settings(LoaderConfig(workers=0), cpus=8)["num_workers"] == 0
