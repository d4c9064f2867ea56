"""FLOPs ratios follow the pixel counts of the scale sets."""

import pytest

from components.flops import inference_flops, train_step_flops
from tests.conftest import tiny_model_config

SIZE = (128, 256)


@pytest.mark.parametrize("scales", [[0.5, 1.0], [0.5, 1.0, 2.0], [0.25, 0.5, 1.0, 2.0]])
def test_inference_flops_scale_with_pixels(scales):
    cfg = tiny_model_config(method="avgpool", trunk="resnet18")
    single = inference_flops(cfg, [1.0], SIZE)
    ratio = inference_flops(cfg, scales, SIZE) / single
    assert ratio == pytest.approx(sum(s * s for s in scales), rel=0.01)


def test_training_step_ratios():
    single = train_step_flops(tiny_model_config(method="single", trunk="resnet18"), SIZE)
    hier_cfg = tiny_model_config(method="hierarchical", trunk="resnet18", train_scales=[0.5, 1.0])
    explicit_cfg = tiny_model_config(method="explicit", trunk="resnet18", train_scales=[0.5, 1.0, 2.0])
    hier = train_step_flops(hier_cfg, SIZE) / single
    explicit = train_step_flops(explicit_cfg, SIZE) / single
    # 1 + 0.25 and 0.25 + 1 + 4 pixels; the attention heads add a few percent on top.
    assert 1.25 <= hier <= 1.25 * 1.15
    assert 5.25 <= explicit <= 5.25 * 1.1
    # A training step costs about three forward passes (forward + two for backward).
    forward = inference_flops(tiny_model_config(method="single", trunk="resnet18"), [1.0], SIZE)
    assert 2.5 <= single / forward <= 3.1


def test_the_flops_table_of_the_docs_is_what_the_command_prints():
    """docs/model.md shows `python -m benchmarks.flops_table` at its defaults (the paper's model at
    512x1024): counted, not measured, so the docs must hold it exactly, not an older model's."""
    from benchmarks.flops_table import flops_table, table_lines
    from tests.dvc_helpers import ROOT

    printed = table_lines(flops_table((512, 1024)))
    shown = [line for line in (ROOT / "docs" / "model.md").read_text().splitlines() if line.startswith("|")]
    assert shown[:len(printed)] == printed
