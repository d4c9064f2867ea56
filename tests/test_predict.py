"""`predict` loses nothing of the user's and writes nothing partial."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from components.models import build_model, save_model
from tests.conftest import tiny_model_config
from tests.output_checks import project_tracebacks
from tests.services import python_env
from tests.train_helpers import write_params


def setup(tmp_path):
    cfg = tiny_model_config(num_classes=19)
    save_model(build_model(cfg).eval(), cfg, tmp_path / "model")
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(
            tmp_path / folder / "street.png")
    return write_params(tmp_path, tmp_path)


def predict(tmp_path, params, *inputs, extra=()):
    command = [sys.executable, "-m", "pipeline.predict", *map(str, inputs), "--model", str(tmp_path / "model"),
               "--params", str(params), "--output", str(tmp_path / "out"), *extra]
    return subprocess.run(command, capture_output=True, text=True, env=python_env())


def test_same_named_inputs_are_refused_with_their_names(tmp_path):
    params = setup(tmp_path)
    done = predict(tmp_path, params, tmp_path / "a", tmp_path / "b")
    assert done.returncode == 1 and "same name" in done.stderr and "a/street.png" in done.stderr \
        and "b/street.png" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_existing_outputs_are_not_overwritten_without_asking(tmp_path):
    params = setup(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "street_label.png").write_bytes(b"the user's own file")
    done = predict(tmp_path, params, tmp_path / "a" / "street.png")
    assert done.returncode == 1 and "street_label.png already exist" in done.stderr, done.stderr
    assert (tmp_path / "out" / "street_label.png").read_bytes() == b"the user's own file"
    # --overwrite replaces label maps and overlays (PNGs), not a file of another kind under such a name
    done = predict(tmp_path, params, tmp_path / "a" / "street.png", extra=["--overwrite"])
    assert done.returncode == 1 and "street_label.png: holds a file this pipeline did not write" in done.stderr
    assert (tmp_path / "out" / "street_label.png").read_bytes() == b"the user's own file"
    Image.new("P", (4, 4)).save(tmp_path / "out" / "street_label.png")  # an earlier run's label map
    assert predict(tmp_path, params, tmp_path / "a" / "street.png", extra=["--overwrite"]).returncode == 0
    assert np.array(Image.open(tmp_path / "out" / "street_label.png")).shape == (32, 48)


def test_overwrite_never_replaces_an_input_of_the_run(tmp_path):
    """An input that is (through links) the output folder's `street_label.png`: with --overwrite the run
    would replace the file it reads. Paths are compared where the files land, not as spelt."""
    params = setup(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "street_label.png").write_bytes((tmp_path / "a" / "street.png").read_bytes())
    (tmp_path / "link").symlink_to(tmp_path / "out")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "street.png").symlink_to(tmp_path / "link" / "street_label.png")
    before = (tmp_path / "out" / "street_label.png").read_bytes()
    done = predict(tmp_path, params, tmp_path / "in" / "street.png", extra=["--overwrite"])
    assert done.returncode == 1 and "street_label.png is an input of this run" in done.stderr, done.stderr
    assert (tmp_path / "out" / "street_label.png").read_bytes() == before


def test_an_unreadable_input_stops_the_run_before_anything_is_written(tmp_path):
    params = setup(tmp_path)
    (tmp_path / "a" / "zz-broken.png").write_bytes(b"not a png")
    done = predict(tmp_path, params, tmp_path / "a")
    assert done.returncode == 1 and "zz-broken.png: unreadable image" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_predict_and_the_served_model_see_what_evaluate_saw(tmp_path):
    """On the val split at every default scale set, the label maps of `predict` and of the pyfunc
    model give exactly evaluate's confusion matrix: the scale levels are made the same way."""
    import io
    from types import SimpleNamespace

    import pandas as pd

    from components.config import load_config
    from components.data.dataset import PyramidEvalDataset
    from components.data.pyramid import PyramidReader
    from components.evaluation import evaluate_shard
    from components.metrics import ConfusionMatrix
    from components.models import load_saved_model
    from pipeline.predict import predict_labels
    from pipeline.runtime.serving_model import MultiScaleSegmentationModel
    from tests.dvc_helpers import ROOT
    from tests.train_helpers import tiny_pyramid

    reader = PyramidReader(str(tiny_pyramid(tmp_path, train_images=1, val_images=3) / "pyramid"))
    cfg = tiny_model_config(num_classes=19)
    save_model(build_model(cfg).eval(), cfg, tmp_path / "model")
    model, _ = load_saved_model(tmp_path / "model")
    served = MultiScaleSegmentationModel()
    served.load_context(SimpleNamespace(artifacts={"model_dir": str(tmp_path / "model")}, model_config={}))
    for scales in load_config(ROOT / "params.yaml").evaluate.scale_sets:
        dataset = PyramidEvalDataset(reader, "val", scales)
        (evaluated,) = evaluate_shard(model, dataset, list(range(len(dataset))), [scales], 19, batch_size=4)
        by_predict, by_pyfunc = ConfusionMatrix(19), ConfusionMatrix(19)
        for index in range(len(dataset)):
            image, label = reader.read("val", index, [1.0])[1.0]
            by_predict.update(torch.from_numpy(predict_labels(model, image, scales)), torch.from_numpy(label))
            png = io.BytesIO()
            Image.fromarray(image).save(png, format="PNG")
            (served_label,) = served.predict(None, pd.DataFrame({"image": [png.getvalue()]}), {"scales": scales})
            by_pyfunc.update(torch.from_numpy(served_label), torch.from_numpy(label))
        assert np.array_equal(by_predict.matrix.numpy(), evaluated["matrix"]), scales
        assert np.array_equal(by_pyfunc.matrix.numpy(), evaluated["matrix"]), scales


def test_an_image_declaring_a_huge_size_is_refused_before_decoding():
    import io

    import pytest

    from components.data.images import decode_image

    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, format="PNG")
    with pytest.raises(ValueError, match="row 0: image declares 8x8 pixels, more than 10"):
        decode_image(png.getvalue(), "row 0", max_pixels=10)
    assert decode_image(png.getvalue(), "row 0").shape == (8, 8, 3)


def test_user_fixable_failures_are_one_line(tmp_path):
    """A truncated weights file, weights of another model, `--scales inf`: one line naming the
    file or value, no traceback."""
    import json

    params = setup(tmp_path)
    image = tmp_path / "a" / "street.png"
    for name, damage, message in [
        ("inf", None, "scales must be positive, finite and distinct"),
        ("truncated", lambda d: (d / "weights.safetensors").write_bytes((d / "weights.safetensors").read_bytes()[:100]),
         "weights.safetensors: the weights cannot be loaded"),
        ("other-model", lambda d: (d / "config.json").write_text(json.dumps(
            {**json.loads((d / "config.json").read_text()),
             "model": {**json.loads((d / "config.json").read_text())["model"], "decoder_channels": 48}})),
         "the weights cannot be loaded into the model its config.json describes"),
    ]:
        model = tmp_path / f"model-{name}"
        model.mkdir()
        for f in (tmp_path / "model").iterdir():
            (model / f.name).write_bytes(f.read_bytes())
        if damage:
            damage(model)
        done = subprocess.run([sys.executable, "-m", "pipeline.predict", str(image), "--model", str(model),
                               "--params", str(params), "--output", str(tmp_path / f"out-{name}"),
                               "--scales", *(["inf", "1"] if name == "inf" else ["1"])],
                              capture_output=True, text=True, env=python_env())
        assert done.returncode == 1 and message in done.stderr, done.stderr[-2000:]
        assert not project_tracebacks(done.stderr), done.stderr[-2000:]
        assert not (tmp_path / f"out-{name}").exists()


def _hostile(tmp_path, kind):
    folder = tmp_path / "a"
    entry = folder / "x.png"
    if kind == "fifo":
        os.mkfifo(entry)  # opened plainly, it would wait for a writer for ever
    elif kind == "device":
        entry.symlink_to("/dev/zero")  # read whole, it never ends
    elif kind == "sparse":
        with open(entry, "wb") as handle:
            handle.truncate(6 << 30)  # 6 GB declared, read whole before: MemoryError
    elif kind == "loop":
        entry.symlink_to(entry)
    else:
        entry.mkdir()
    return {"fifo": "is a FIFO (named pipe), not a regular file", "device": "is a device, not a regular file",
            "sparse": f"is {6 << 30} bytes, more than", "loop": "a loop of symbolic links",
            "folder": "is a folder, not a regular file"}[kind]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["fifo", "device", "sparse", "loop", "folder"])
def test_an_input_that_is_not_an_image_file_is_named_without_hanging(tmp_path, kind):
    from components.models import load_saved_model
    from pipeline.predict import list_images
    from pipeline.predict import predict as run_predict

    setup(tmp_path)
    expected = _hostile(tmp_path, kind)
    model, _ = load_saved_model(tmp_path / "model")
    with pytest.raises(ValueError, match=re.escape(expected)) as err:
        run_predict(model, list_images([str(tmp_path / "a")]), [1.0], tmp_path / "out", colors=[(0, 0, 0)] * 19)
    assert str(tmp_path / "a" / "x.png") in str(err.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_inputs_are_decoded_one_at_a_time(tmp_path, monkeypatch):
    """Each input's outputs are written (to disk, renamed into place at the end) before the next input
    is decoded: memory does not grow with the number of inputs (it used to decode every input first).
    An input whose header reads but whose pixels do not still leaves nothing written."""
    import pipeline.predict as predict_module
    from components.models import load_saved_model

    setup(tmp_path)
    for i in range(3):
        Image.fromarray(np.full((16, 24, 3), i * 80, np.uint8)).save(tmp_path / "a" / f"img{i}.png")
    events = []
    decode, save = predict_module.read_image, predict_module._save_png
    monkeypatch.setattr(predict_module, "read_image", lambda path: events.append("decode") or decode(path))
    monkeypatch.setattr(predict_module, "_save_png", lambda *args: events.append("write") or save(*args))
    model, _ = load_saved_model(tmp_path / "model")
    predict_module.predict(model, predict_module.list_images([str(tmp_path / "a")]), [1.0], tmp_path / "out",
                           colors=[(0, 0, 0)] * 19)
    assert events == ["decode", "write", "write"] * 4  # street.png and img0..2, each written before the next
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    png = (tmp_path / "a" / "img2.png").read_bytes()
    (tmp_path / "a" / "zz.png").write_bytes(png[: len(png) // 2])  # its header reads, its pixels do not
    with pytest.raises(ValueError, match="zz.png: unreadable image"):
        predict_module.predict(model, predict_module.list_images([str(tmp_path / "a")]), [1.0], tmp_path / "out2",
                               colors=[(0, 0, 0)] * 19)
    assert not any((tmp_path / "out2").iterdir()) and len(written) == 8


def test_the_served_model_bounds_the_work_of_a_request(tmp_path):
    """Work = the images' pixels x the sum of the squared scales, read from the headers before any
    image is decoded: `scales: [1.0, 200.0]` in a 215-byte request took a server to 3.5 GB."""
    import io
    import json
    from types import SimpleNamespace

    import pandas as pd
    from mlflow.exceptions import MlflowException

    from pipeline.runtime.serving_model import MultiScaleSegmentationModel

    setup(tmp_path)
    (tmp_path / "serving.json").write_text(json.dumps({"default_scales": [1.0], "max_request_pixels": 20_000}))
    served = MultiScaleSegmentationModel()
    served.load_context(SimpleNamespace(artifacts={"model_dir": str(tmp_path / "model"),
                                                   "serving_defaults": str(tmp_path / "serving.json")}))
    png = io.BytesIO()
    Image.new("RGB", (48, 32)).save(png, format="PNG")  # 1536 pixels
    one = pd.DataFrame({"image": [png.getvalue()]})
    assert served.predict(None, one, {"scales": [0.5, 1.0, 2.0]})[0].shape == (32, 48)  # 8064 <= 20000
    with pytest.raises(MlflowException, match=r"asks for 6.144e\+07 pixels of work .* at most 20000") as err:
        served.predict(None, one, {"scales": [1.0, 200.0]})
    assert err.value.get_http_status_code() == 400
    many = pd.DataFrame({"image": [png.getvalue()] * 14})  # 14 x 1536 = 21504 at scale 1.0
    with pytest.raises(MlflowException, match="21504 image pixels"):
        served.predict(None, many, {"scales": [1.0]})


def test_an_input_name_too_long_for_its_outputs_is_refused_by_name(tmp_path):
    """A 245-byte stem fits a file name, but `<stem>_overlay.png`'s temporary does not: it used to
    end in a traceback (ENAMETOOLONG) once the first output was opened."""
    params = setup(tmp_path)
    long_name = tmp_path / "a" / f"{'n' * 245}.png"
    (tmp_path / "a" / "street.png").rename(long_name)
    done = predict(tmp_path, params, long_name)
    assert done.returncode == 1 and "its name is too long for its outputs' names" in done.stderr, done.stderr
    assert not project_tracebacks(done.stderr) and not (tmp_path / "out").exists()
