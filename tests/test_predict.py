"""`predict` loses nothing of the user's and writes nothing partial."""

import subprocess
import sys

import numpy as np
from PIL import Image

from components.models import build_model, save_model
from tests.conftest import tiny_model_config
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
    assert predict(tmp_path, params, tmp_path / "a" / "street.png", extra=["--overwrite"]).returncode == 0
    assert np.array(Image.open(tmp_path / "out" / "street_label.png")).shape == (32, 48)


def test_an_unreadable_input_stops_the_run_before_anything_is_written(tmp_path):
    params = setup(tmp_path)
    (tmp_path / "a" / "zz-broken.png").write_bytes(b"not a png")
    done = predict(tmp_path, params, tmp_path / "a")
    assert done.returncode == 1 and "zz-broken.png: unreadable image" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
