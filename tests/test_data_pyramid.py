"""Generator determinism, pyramid round trip and the aligned multi-scale loader."""

from pathlib import Path

import numpy as np
import pytest
import torch

from components.config import LoaderConfig, load_config
from components.data.classes import cityscapes_lookup
from components.data.dataset import (
    MEAN,
    STD,
    PyramidEvalDataset,
    PyramidTrainDataset,
    class_uniform_order,
    crop_windows,
)
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
    """Pole widths (horizontal runs of pole pixels): a few pixels at full scale, so that at half
    scale most are a pixel or two wide and only the high scales resolve them."""
    widths = []
    for i in range(6):
        _, label = render_scene(0, "train", i, 192, 384)
        for row in (label == 17).astype(np.int8):
            edges = np.diff(np.concatenate([[0], row, [0]]))
            widths += (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).tolist()
    assert widths and np.median(widths) <= 3 and max(widths) <= 8


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


def test_a_training_sample_is_a_function_of_seed_epoch_and_index(pyramid):
    """Colour jitter included: the same train.seed trains on the same samples in every run and
    process, and another seed or epoch on others."""
    reader = PyramidReader(str(pyramid / "pyramid"))
    cfg = LoaderConfig(random_scales=[0.5, 1.0, 2.0], photometric_probability=1.0)

    def samples(seed: int, epoch: int) -> list[torch.Tensor]:
        ds = PyramidTrainDataset(reader, "train", [0.5, 1.0], (48, 64), cfg, seed=seed)
        ds.set_epoch(epoch)
        return [ds[i]["images"][1.0] for i in range(len(ds))]

    first = samples(seed=3, epoch=1)
    assert all(a.equal(b) for a, b in zip(first, samples(seed=3, epoch=1), strict=True))
    assert not any(a.equal(b) for a, b in zip(first, samples(seed=4, epoch=1), strict=True))
    assert not any(a.equal(b) for a, b in zip(first, samples(seed=3, epoch=2), strict=True))


def test_eval_dataset_and_class_uniform_sampling(pyramid):
    reader = PyramidReader(str(pyramid / "pyramid"))
    ds = PyramidEvalDataset(reader, "val", [0.25, 0.75, 1.0])
    # every scale is made from the 1.0 level with the pyramid's own resize, stored or not
    assert ds.scales == [0.25, 0.75, 1.0]
    assert ds[0]["images"][1.0].shape == (3, 64, 96) and ds[0]["images"][0.75].shape == (3, 48, 72)
    entries = [{"classes": [0]}] * 9 + [{"classes": [0, 5]}]
    epochs = [class_uniform_order(entries, 19, 1.0, np.random.default_rng(seed)) for seed in range(50)]
    order, targets = np.concatenate([o for o, _ in epochs]), np.concatenate([t for _, t in epochs])
    assert 0.45 < (order == 9).mean() < 0.65  # the only image with class 5: 0.5 + 0.5 / 10 of the draws
    assert (order[targets == 5] == 9).all() and set(targets.tolist()) == {0, 5}
    order, targets = class_uniform_order(entries, 19, 0.0, np.random.default_rng(0))
    assert (order == np.arange(10)).all() and (targets == -1).all()


@pytest.mark.parametrize("random_scale_range", [None, (0.5, 2.0)])
def test_class_uniform_crops_contain_the_class_they_were_drawn_for(pyramid, random_scale_range):
    """The reference code's class-uniform sampling: the crop of a sample drawn for class c is placed
    on a pixel of c, so a rare thin class is inside the crop, not only somewhere in the image."""
    reader = PyramidReader(str(pyramid / "pyramid"))
    cfg = LoaderConfig(random_scales=[1.0], random_scale_range=random_scale_range, class_uniform=1.0,
                       photometric_probability=0.0, flip=False)
    ds = PyramidTrainDataset(reader, "train", [0.5, 1.0], (16, 16), cfg, seed=0)
    misses, drawn = 0, 0
    for epoch in range(8):
        ds.set_epoch(epoch)
        for index in range(len(ds)):
            target = int(ds.targets[index])
            assert target >= 0  # share 1.0: every sample is drawn for a class
            drawn += 1
            misses += not (ds[index]["label"] == target).any()
    # Only a class that the randomly scaled image no longer shows can miss (a pole at 0.5).
    assert drawn == 40 and misses <= 2, f"{misses} of {drawn} crops miss their class"


def test_loader_processes_and_pinned_memory_are_sized_from_the_machine():
    from components.config import LoaderConfig
    from components.data.dataset import loader_settings

    auto = LoaderConfig()
    assert loader_settings(auto, cpus=1)["num_workers"] == 0  # a loader process would take the only CPU
    assert loader_settings(auto, cpus=2) == {"num_workers": 1, "persistent_workers": True, "pin_memory": False}
    assert loader_settings(auto, cpus=16)["num_workers"] == 4  # CPU training: its threads keep the rest
    # A GPU worker: every CPU but its own feeds the GPU, in pinned memory, 8 batches ahead in all
    assert loader_settings(auto, cpus=16, device_type="cuda") == {
        "num_workers": 15, "persistent_workers": True, "pin_memory": True, "prefetch_factor": 2}
    assert loader_settings(auto, cpus=3, device_type="cuda")["prefetch_factor"] == 4
    assert loader_settings(auto, cpus=1, device_type="cuda") == {"num_workers": 0, "persistent_workers": False,
                                                                 "pin_memory": True}  # DataLoader refuses prefetch
    assert loader_settings(LoaderConfig(workers=0), cpus=8)["num_workers"] == 0


def default_training_scale_sets() -> dict[str, list[float]]:
    """Every training scale set the shipped params.yaml can train: the model's, the tune search's
    and each ablation method's."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml")
    sets = {"model.train_scales": cfg.model.train_scales}
    sets.update({f"tune.train_scale_sets.{k}": v for k, v in cfg.tune.train_scale_sets.items()})
    sets.update({f"ablation.methods.{k}": m.train_scales for k, m in cfg.ablation.methods.items()})
    return sets


@pytest.mark.parametrize("name", sorted(default_training_scale_sets()))
def test_crop_windows_are_exact_at_every_level_of_the_default_pyramid(name):
    """For every default training scale set and every random scale (the level that plays 1.0), each
    level's window is the 1.0 window times its scale exactly, in whole pixels: no level is off by a
    rounded half pixel (0.75 used to be, for about half the crops)."""
    from fractions import Fraction

    cfg = load_config(Path(__file__).resolve().parents[1] / "params.yaml")
    scales = default_training_scale_sets()[name]
    size = (cfg.prepare.synthetic.height, cfg.prepare.synthetic.width)
    crop = cfg.ablation.crop_size if name.startswith("ablation") else cfg.train.crop_size
    random_scales = cfg.ablation.random_scales if name.startswith("ablation") else cfg.loader.random_scales
    rng = np.random.default_rng(0)
    for r in random_scales:
        base = (round(size[0] * r), round(size[1] * r))
        for _ in range(200):
            windows = crop_windows(base, crop, scales, rng)
            y, x, h, w = windows.get(1.0, (None,) * 4)
            for s, window in windows.items():
                assert round(r * s, 6) in [round(v, 6) for v in cfg.pyramid.scales]
                exact = [Fraction(v) / Fraction(s).limit_denominator(64) for v in window]
                if y is not None:
                    assert exact == [y, x, h, w], (r, s, window, windows[1.0])
                assert all(e.denominator == 1 for e in exact) or s > 1.0


def test_a_crop_at_a_lower_level_is_the_area_resize_of_the_full_crop(tmp_path):
    """Pixels, not just windows: with the default pyramid's levels, the crop at 0.75, 0.5, 0.375
    and 0.25 is exactly the area resize of the 1.0 crop (only an aligned window makes it so)."""
    levels = [0.25, 0.375, 0.5, 0.75, 1.0]
    write_cityscapes_layout(tmp_path / "cs", {"train": 3, "val": 1}, 64, 96, seed=2)
    prepare_dataset(read_cityscapes(tmp_path / "cs"), tmp_path / "raw")
    build_pyramid(tmp_path / "raw", levels, shard_size=2, storage=Storage(), output=str(tmp_path / "pyramid"))
    reader = PyramidReader(str(tmp_path / "pyramid"))
    cfg = LoaderConfig(random_scales=[1.0], photometric_probability=0.0, flip=False)
    for scales in ([0.75, 1.0], [0.5, 1.0], [0.375, 1.0], [0.25, 0.5, 1.0]):
        ds = PyramidTrainDataset(reader, "train", scales, (40, 56), cfg, seed=1)
        for index in range(len(ds)):
            item = ds[index]
            full = (item["images"][1.0].permute(1, 2, 0).numpy() * STD + MEAN).round().clip(0, 255).astype(np.uint8)
            for s in scales[:-1]:
                low = (item["images"][s].permute(1, 2, 0).numpy() * STD + MEAN).round().clip(0, 255).astype(np.uint8)
                expected = resize_image(full, (low.shape[0], low.shape[1]))
                assert np.abs(low.astype(int) - expected.astype(int)).max() <= 1, (scales, s, index)


def test_a_continuous_random_scale_range_keeps_every_level_aligned(pyramid):
    """loader.random_scale_range (the paper's 0.5 to 2.0): any r, not only stored levels; the image at
    r comes from the nearest stored level at or above it, and the lower training scales are resizes
    of the very crop, so they show exactly its region."""
    reader = PyramidReader(str(pyramid / "pyramid"))
    cfg = LoaderConfig(random_scale_range=(0.5, 2.0), photometric_probability=0.0, flip=False)
    ds = PyramidTrainDataset(reader, "train", [0.5, 1.0], (32, 48), cfg, seed=4)
    for index in range(len(ds)):
        item = ds[index]
        full = (item["images"][1.0].permute(1, 2, 0).numpy() * STD + MEAN).round().clip(0, 255).astype(np.uint8)
        low = (item["images"][0.5].permute(1, 2, 0).numpy() * STD + MEAN).round().clip(0, 255).astype(np.uint8)
        assert full.shape == (32, 48, 3) and low.shape == (16, 24, 3) and item["label"].shape == (32, 48)
        assert np.abs(low.astype(int) - resize_image(full, (16, 24)).astype(int)).max() <= 1
    # the range needs no particular pyramid levels: a set the discrete loader could not read is fine
    from components.config import validate_config

    validate_config({"loader": {"random_scales": [0.3], "random_scale_range": [0.5, 2.0]}})


def test_crop_windows_are_exact_where_floats_are_not():
    """0.7 * 90 is 62.99999... in floating point: the window must still start at pixel 63."""
    rng = np.random.default_rng(0)
    for _ in range(500):
        windows = crop_windows((400, 400), (40, 70), [0.7, 1.0], rng)
        top, left, _height, _width = windows[1.0]
        assert windows[0.7] == (top * 7 // 10, left * 7 // 10, 28, 49) and top % 10 == 0 == left % 10


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """A pyramid in tiles of 16 pixels: a 64x96 image is 4x6 tiles at 1.0, so windows cross tiles."""
    root = tmp_path_factory.mktemp("tiled")
    write_cityscapes_layout(root / "cs", {"train": 3, "val": 1}, 64, 96, seed=5)
    prepare_dataset(read_cityscapes(root / "cs"), root / "raw")
    build_pyramid(root / "raw", [0.25, 0.375, 0.5, 0.75, 1.0, 1.5, 2.0], shard_size=2, storage=Storage(),
                  output=str(root / "pyramid"), tile=16)
    return root


def test_the_pyramid_stores_1_and_its_halvings_and_makes_the_other_levels_exactly(tiled):
    """Any window of any level, stored or made on read from the 1.0 region under it, is exactly that
    window of the whole level: the 1.0 image resized with the one resize of the project."""
    from PIL import Image

    from components.data.resize import resize_image as whole_image
    from components.data.resize import resize_label as whole_label

    reader = PyramidReader(str(tiled / "pyramid"))
    assert reader.stored == [0.25, 0.5, 1.0]
    entry = reader.entries("train")[2]
    image = np.asarray(Image.open(tiled / "raw" / "images" / "train" / f"{entry['id']}.png"))
    label = np.asarray(Image.open(tiled / "raw" / "labels" / "train" / f"{entry['id']}.png"))
    rng = np.random.default_rng(0)
    for s in reader.scales:
        size = (round(64 * s), round(96 * s))
        level_image, level_label = whole_image(image, size), whole_label(label, size)
        for _ in range(15):
            top, left = int(rng.integers(-5, size[0])), int(rng.integers(-5, size[1]))
            height, width = int(rng.integers(1, 40)), int(rng.integers(1, 40))
            got_image, got_label = reader.read_window("train", 2, s, (top, left, height, width))
            rows = slice(max(0, top), max(0, top + height))
            cols = slice(max(0, left), max(0, left + width))
            assert np.array_equal(got_image, level_image[rows, cols]), (s, top, left)
            assert np.array_equal(got_label, level_label[rows, cols]), (s, top, left)


def test_a_crop_reads_only_the_tiles_under_it_and_decodes_them_once(tiled):
    def bytes_read(window: tuple[int, int, int, int]) -> int:
        reader = PyramidReader(str(tiled / "pyramid"))  # a new process's reader: nothing decoded yet
        reader.read_window("train", 0, 1.0, (0, 0, 1, 1))  # the shard's index, read once, and one tile
        before = reader.bytes_read
        reader.read_window("train", 0, 1.0, window)
        return reader.bytes_read - before

    whole = bytes_read((0, 0, 64, 96))
    assert 0 < bytes_read((20, 20, 16, 16)) < whole * 6 / 24  # 2x2 of the 4x6 tiles
    reader = PyramidReader(str(tiled / "pyramid"))
    first = reader.read_window("train", 1, 0.5, (0, 0, 32, 48))
    before = reader.bytes_read
    again = reader.read_window("train", 1, 0.5, (3, 5, 20, 30))  # decoded tiles are kept: nothing read
    assert reader.bytes_read == before and np.array_equal(again[0], first[0][3:23, 5:35])


def test_class_points_lie_on_their_class(tiled):
    reader = PyramidReader(str(tiled / "pyramid"))
    for index, entry in enumerate(reader.entries("train")):
        label = reader.read("train", index, [1.0])[1.0][1]
        for cls in entry["classes"]:
            points = reader.points("train", index, cls)
            assert 0 < len(points) <= 16 and all(label[y, x] == cls for y, x in points)


def test_a_pyramid_of_another_format_is_refused_with_what_to_run(tiled, tmp_path):
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiled / "pyramid", old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(ValueError, match=r"pyramid format 1 is not the format 2 .*dvc repro --force pyramid"):
        PyramidReader(str(old))


def test_a_killed_build_keeps_the_old_pyramid_and_the_next_run_keeps_its_finished_shards(tmp_path, monkeypatch):
    import components.data.pyramid as pyramid_module

    write_cityscapes_layout(tmp_path / "cs", {"train": 5, "val": 1}, 32, 48, seed=3)
    prepare_dataset(read_cityscapes(tmp_path / "cs"), tmp_path / "raw")
    output = tmp_path / "pyramid"
    build_pyramid(tmp_path / "raw", [0.5, 1.0], shard_size=2, storage=Storage(), output=str(output))
    before = (output / "manifest.json").read_text()
    real, built = pyramid_module.write_shard, []

    def dies_at_the_third_shard(*args, **kwargs):
        if len(built) == 2:
            raise KeyboardInterrupt  # as a kill: nothing after it runs
        built.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(pyramid_module, "write_shard", dies_at_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        build_pyramid(tmp_path / "raw", [0.25, 0.5, 1.0], shard_size=2, storage=Storage(), output=str(output))
    assert (output / "manifest.json").read_text() == before  # the old pyramid is whole
    assert len(list(tmp_path.glob(".pyramid.build-*"))) == 1
    # The same inputs again: the two finished shards are kept, only the rest is built.
    counted = []
    monkeypatch.setattr(pyramid_module, "write_shard", lambda *a, **k: counted.append(a[1]) or real(*a, **k))
    build_pyramid(tmp_path / "raw", [0.25, 0.5, 1.0], shard_size=2, storage=Storage(), output=str(output))
    assert len(counted) == 2  # train-00002 and val-00000 of 4 shards
    assert PyramidReader(str(output)).scales == [0.25, 0.5, 1.0] and not list(tmp_path.glob(".pyramid.build-*"))
    # A build of other inputs removes a leftover build folder rather than mixing with it.
    leftover = tmp_path / ".pyramid.build-000000000000"
    leftover.mkdir()
    build_pyramid(tmp_path / "raw", [0.5, 1.0], shard_size=2, storage=Storage(), output=str(output))
    assert not leftover.exists()


def test_generate_prepare_and_pyramid_in_parallel_write_what_they_write_in_turn(tmp_path):
    """The data stages' outputs do not depend on how many processes wrote them."""
    for workers in (1, 2):
        write_cityscapes_layout(tmp_path / f"cs{workers}", {"train": 4, "val": 2}, 32, 48, seed=4, workers=workers)
        prepare_dataset(read_cityscapes(tmp_path / f"cs{workers}"), tmp_path / f"raw{workers}", workers=workers)
        build_pyramid(tmp_path / f"raw{workers}", [0.5, 1.0, 2.0], shard_size=2, storage=Storage(),
                      output=str(tmp_path / f"p{workers}"), workers=workers)
    for folder in ("cs", "raw", "p"):
        files = {p.relative_to(tmp_path / f"{folder}1"): p.read_bytes() for p in (tmp_path / f"{folder}1").rglob("*")
                 if p.is_file()}
        assert files == {p.relative_to(tmp_path / f"{folder}2"): p.read_bytes()
                         for p in (tmp_path / f"{folder}2").rglob("*") if p.is_file()}, folder


@pytest.mark.parametrize("shape", [(5, 7), (37, 53), (64, 96)])
def test_any_window_of_a_resize_is_made_from_its_source_region_alone(shape):
    """The property the tiled pyramid rests on, down and up, at ratios that are and are not whole."""
    from components.data.resize import label_window, resize_window, source_window
    from components.data.resize import resize_image as whole_image
    from components.data.resize import resize_label as whole_label

    rng = np.random.default_rng(shape[0])
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    label = rng.integers(0, 19, shape, dtype=np.uint8)
    for s in (0.25, 0.375, 0.5, 0.7, 0.75, 1.3, 1.5, 2.0):
        size = (max(1, round(shape[0] * s)), max(1, round(shape[1] * s)))
        level_image, level_label = whole_image(image, size), whole_label(label, size)
        for _ in range(20):
            top, left = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
            window = (top, left, int(rng.integers(1, size[0] - top + 1)), int(rng.integers(1, size[1] - left + 1)))
            y, x, h, w = source_window(shape, size, window)
            part = resize_window(image[y : y + h, x : x + w], (y, x), shape, size, window)
            part_label = label_window(label[y : y + h, x : x + w], (y, x), shape, size, window)
            rows, cols = slice(top, top + window[2]), slice(left, left + window[3])
            assert np.array_equal(part, level_image[rows, cols]) and np.array_equal(part_label, level_label[rows, cols])
