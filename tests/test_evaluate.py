"""Evaluation at scale sets never used in training, its outputs, and the Pareto front."""

import json

import pytest
import torch

from components.data.pyramid import PyramidReader
from components.evaluation import pareto_front
from components.models import build_model
from pipeline.evaluate import evaluate_all, write_outputs
from tests.conftest import tiny_model_config
from tests.train_helpers import tiny_pyramid


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    root = tiny_pyramid(tmp_path_factory.mktemp("eval"), train_images=2, val_images=3)
    return PyramidReader(str(root / "pyramid"))


def test_hierarchical_on_unseen_scale_sets(tmp_path, reader):
    cfg = tiny_model_config(num_classes=19, train_scales=[0.5, 1.0])
    model = build_model(cfg).eval()
    sets = [[1.0], [0.25, 0.5, 1.0, 2.0], [0.75, 1.0, 1.5]]  # 0.75 and 1.5 are not even in the pyramid
    with torch.no_grad():
        rows = evaluate_all(model, cfg, reader, sets, flip=True)
    assert [r["scales"] for r in rows] == sets
    for r in rows:
        assert 0 <= r["miou"] <= 1 and r["latency_ms"] > 0 and set(r["iou"]) >= {"road", "pole"}
    # Cost grows with the pixels of the set (x2 for flip).
    assert rows[1]["gflops"] > rows[2]["gflops"] > rows[0]["gflops"]
    write_outputs(tmp_path, rows, model, cfg, reader, pictures=2)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"1", "0.25,0.5,1,2", "0.75,1,1.5"}
    attention = json.loads((tmp_path / "attention_by_class.json").read_text())
    assert set(attention) == {"1"} | {"0.25", "0.5", "1", "2"} and 0 <= attention["0.5"]["road"] <= 1
    assert len(list((tmp_path / "attention").glob("*.png"))) == 2
    assert (tmp_path / "pareto.csv").read_text().startswith("scales,gflops,miou")


def test_a_scale_set_the_method_cannot_use_fails_before_work(reader):
    cfg = tiny_model_config(method="explicit", num_classes=19, train_scales=[0.5, 1.0])
    with pytest.raises(ValueError, match="training scales"):
        evaluate_all(build_model(cfg).eval(), cfg, reader, [[0.5, 1.0], [1.0]], flip=False)


def test_pareto_front():
    rows = [{"gflops": 1, "miou": 0.5}, {"gflops": 2, "miou": 0.4}, {"gflops": 3, "miou": 0.6},
            {"gflops": 3, "miou": 0.6}]
    assert pareto_front(rows) == [True, False, True, True]
