"""Property tests of what reads user files: the dataset readers with `prepare`, and `predict`.

Whatever the files hold (random bytes named .png/.jpg, truncated files, odd modes, huge declared
sizes) and whatever the ids and names are, only our own clear errors come out (naming the file,
id or key), nothing is written outside the output, and no earlier output or user file changes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from components.data.prepare import prepare_dataset
from components.data.readers import open_dataset
from tests.reliability.files import encoded, hostile_names, image_bytes, label_bytes, snapshot

# database=None: nothing written into the checkout (examples are drawn afresh each run)
PROPERTY = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
GOOD_IMAGE = encoded(np.zeros((16, 16, 3), np.uint8), "JPEG")
GOOD_LABEL = encoded(np.zeros((16, 16), np.uint8), "PNG")


def write_voc(root: Path, lists: dict[str, list[str]], files: dict[str, tuple[bytes, bytes]]) -> None:
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    for split, ids in lists.items():
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    for name, (image, label) in files.items():
        for folder, suffix, data in (("JPEGImages", ".jpg", image), ("SegmentationClass", ".png", label)):
            # a name the file system refuses: the list still names it
            with contextlib.suppress(OSError, ValueError):
                (root / folder / f"{name}{suffix}").write_bytes(data)


def check_prepare(folder: Path, root: Path, fmt: str) -> None:
    """A previous output exists; prepare again into it: it is replaced whole, or kept whole."""
    out = folder / "out"
    previous = folder / "good"
    write_voc(previous, {"train": ["a"], "val": ["b"]}, {"a": (GOOD_IMAGE, GOOD_LABEL), "b": (GOOD_IMAGE, GOOD_LABEL)})
    prepare_dataset(open_dataset("voc", previous), out)
    before_out, before_rest = snapshot(out), snapshot(folder, skip=out)
    try:
        manifest = prepare_dataset(open_dataset(fmt, root), out)
    except (ValueError, FileNotFoundError) as err:
        message = str(err)
        event(f"refused: {message.split(': ')[-1][:40]}")
        assert str(root) in message or "prepare." in message or f"{fmt}:" in message, message
        assert snapshot(out) == before_out  # the earlier output is kept whole
    else:
        event("prepared")
        assert (out / "manifest.json").is_file() and manifest["splits"]["train"]
    assert snapshot(folder, skip=out) == before_rest  # nothing outside the output changed or appeared


@PROPERTY
@given(st.lists(st.tuples(hostile_names, image_bytes(), label_bytes(), st.sampled_from(["train", "val"])),
                min_size=1, max_size=4))
def test_voc_prepare_gives_an_output_or_a_named_error(samples):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        root = folder / "voc"
        lists = {"train": [], "val": []}
        for name, _, _, split in samples:
            lists[split].append(name)
        write_voc(root, lists, {name: (image, label) for name, image, label, _ in samples})
        check_prepare(folder, root, "voc")


classes_lines = st.lists(st.one_of(
    st.from_regex(r"[a-z]{1,6}( \d{1,3} \d{1,3} \d{1,3})?( thin)?", fullmatch=True),
    st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\r"), max_size=20)), max_size=5)


@PROPERTY
@given(classes_lines, st.lists(st.tuples(hostile_names, image_bytes(), label_bytes(classes=3)), min_size=1,
                               max_size=3), st.booleans())
def test_folder_prepare_gives_an_output_or_a_named_error(lines, samples, stray_file):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        root = folder / "folder"
        for split in ("train", "val"):
            (root / "images" / split).mkdir(parents=True)
            (root / "masks" / split).mkdir(parents=True)
        (root / "classes.txt").write_text("\n".join(lines))
        if stray_file:
            (root / "images" / "README").write_text("not a split")
        for i, (name, image, label) in enumerate(samples):
            split = ("train", "val")[i % 2]
            try:
                (root / "images" / split / f"{name}.png").write_bytes(image)
                (root / "masks" / split / f"{name}.png").write_bytes(label)
            except (OSError, ValueError):
                pass  # a name this file system refuses: that sample is simply absent
        check_prepare(folder, root, "folder")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from components.models import build_model, save_model
    from components.models.saved import load_saved_model
    from tests.conftest import tiny_model_config

    folder = tmp_path_factory.mktemp("model")
    cfg = tiny_model_config(num_classes=3)
    save_model(build_model(cfg).eval(), cfg, folder / "model")
    return load_saved_model(folder / "model")[0]


# What else can stand where an input image should: each is refused by its name, never a hang or a traceback.
HOSTILE_ENTRIES = ["fifo", "device", "loop", "folder", "sparse"]


def write_entry(path: Path, data: bytes | str) -> None:
    """Put `data` at `path`; a name drawn twice keeps its first entry (writing to a FIFO made by the
    first would wait for a reader for ever)."""
    if os.path.lexists(path):
        return
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif data == "fifo":
        os.mkfifo(path)
    elif data == "device":
        path.symlink_to("/dev/zero")
    elif data == "loop":
        path.symlink_to(path)
    elif data == "folder":
        path.mkdir()
    else:
        with open(path, "wb") as handle:
            handle.truncate(6 << 30)


@PROPERTY
@given(st.lists(st.tuples(st.one_of(hostile_names, st.just("n" * 245)),
                          st.one_of(image_bytes(24, 32), image_bytes(24, 32), st.sampled_from(HOSTILE_ENTRIES))),
                min_size=1, max_size=4),
       st.booleans(), st.booleans())
def test_predict_writes_every_label_map_or_nothing(tiny_model, inputs, overwrite, earlier_run):
    """A folder of inputs with any contents, names (up to the file system's length limit) and file
    types (FIFOs, devices, link loops, folders and sparse 6 GB files named like images), an output
    folder holding a user's file or an earlier run's label map: predict writes label maps for all of
    them (replacing only an earlier label map, with --overwrite), or refuses naming the file and
    writes nothing."""
    from pipeline.predict import list_images, predict

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "in").mkdir()
        (folder / "out").mkdir()
        for name, data in inputs:
            with contextlib.suppress(OSError, ValueError):  # a name this file system refuses
                write_entry(folder / "in" / f"{name}.png", data)
        first = next(iter((folder / "in").iterdir()), None)
        if first is not None:  # the user's own file, or an earlier run's label map, where a first output goes
            (folder / "out" / f"{first.stem}_label.png").write_bytes(
                encoded(np.zeros((24, 32), np.uint8), "PNG") if earlier_run else b"the user's own file")
        before = snapshot(folder)
        try:
            written = predict(tiny_model, list_images([str(folder / "in")]), [1.0], folder / "out",
                              [(0, 0, 0), (255, 0, 0), (0, 255, 0)], overwrite=overwrite)
        except (ValueError, FileNotFoundError, FileExistsError) as err:
            event(f"refused: {type(err).__name__}")
            assert str(folder) in str(err) or "no images found" in str(err), str(err)
            assert snapshot(folder) == before  # nothing written, the user's file untouched
        else:
            event("predicted")
            assert first is None or (overwrite and earlier_run)
            assert len(written) == len(list((folder / "in").iterdir()))
            after = snapshot(folder)
            assert {k: v for k, v in after.items() if k in before and not k.startswith("out/")} == \
                {k: v for k, v in before.items() if not k.startswith("out/")}
            assert all(k.startswith("out/") for k in set(after) - set(before))


@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    """The pyfunc the model server runs, on a tiny saved model, with a small work bound."""
    import json
    from types import SimpleNamespace

    from components.models import build_model, save_model
    from pipeline.runtime.serving_model import MultiScaleSegmentationModel
    from tests.conftest import tiny_model_config

    folder = tmp_path_factory.mktemp("served")
    cfg = tiny_model_config(num_classes=3)
    save_model(build_model(cfg).eval(), cfg, folder / "model")
    (folder / "serving.json").write_text(json.dumps({"default_scales": [1.0], "max_request_pixels": 200_000}))
    served = MultiScaleSegmentationModel()
    served.load_context(SimpleNamespace(artifacts={"model_dir": str(folder / "model"),
                                                   "serving_defaults": str(folder / "serving.json")}))
    return served


scale_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10**6),
                         st.sampled_from([0.5, 1.0, 2.0, 200.0]), st.text(max_size=5), st.none())


@PROPERTY
@given(st.lists(image_bytes(24, 32), max_size=3), st.one_of(st.none(), st.lists(scale_values, max_size=4)),
       st.sampled_from(["image", "img", ""]))
def test_the_served_model_answers_any_request_with_labels_or_a_400(served_model, images, scales, column):
    """Any request body the server can parse (any bytes as images, any values as scales, a wrong
    column): label maps, or one MlflowException the server answers 400 with its reason, never a
    traceback or another error."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    request = pd.DataFrame({column: images}) if images else pd.DataFrame({column: []})
    try:
        labels = served_model.predict(None, request, None if scales is None else {"scales": scales})
    except MlflowException as err:
        event(f"400: {err.message.split(': ')[-1][:30]}")
        assert err.get_http_status_code() == 400, err.message
        assert "Traceback" not in err.message and err.message
    else:
        event("labels")
        from components.data.images import declared_size

        sizes = [declared_size(data, "image")[::-1] for data in images]  # (height, width) of each
        assert [label.shape for label in labels] == sizes
