"""The table of methods (components/methods.py) is the one place a method's rules live: the config,
the model, the trainer and the served model follow it, and it says what the papers describe."""

from __future__ import annotations

import pytest

from components.config import METHODS, ConfigError, validate_config
from components.methods import METHOD_TABLE, eval_scales_problem, train_scales_problem, validation_scales
from components.models import build_model
from tests.conftest import tiny_model_config

TRAINED_ON = {"single": [1.0], "avgpool": [1.0], "maxpool": [1.0], "explicit": [0.5, 1.0, 2.0],
              "hierarchical": [0.5, 1.0]}
# The scale sets each method can predict at, by the papers: single scale at its own scale only,
# pooling and hierarchical attention at any set with 1.0 (the output's resolution), explicit
# attention (a softmax over a fixed number of scales) at its training scales only.
CANDIDATES = ([1.0], [0.5, 1.0], [0.5, 1.0, 2.0], [0.25, 0.5, 1.0, 2.0], [0.5, 2.0])
PREDICTS_AT = {
    "single": [[1.0]],
    "avgpool": [[1.0], [0.5, 1.0], [0.5, 1.0, 2.0], [0.25, 0.5, 1.0, 2.0]],
    "maxpool": [[1.0], [0.5, 1.0], [0.5, 1.0, 2.0], [0.25, 0.5, 1.0, 2.0]],
    "explicit": [[0.5, 1.0, 2.0]],
    "hierarchical": [[1.0], [0.5, 1.0], [0.5, 1.0, 2.0], [0.25, 0.5, 1.0, 2.0]],
}


def test_every_method_of_the_config_has_one_row():
    assert list(METHOD_TABLE) == list(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_the_model_predicts_at_exactly_the_sets_of_its_row(method):
    model = build_model(tiny_model_config(method=method, train_scales=TRAINED_ON[method]))
    for scales in CANDIDATES:
        allowed = eval_scales_problem(method, TRAINED_ON[method], scales) is None
        assert allowed == (scales in PREDICTS_AT[method]), (method, scales)
        if allowed:
            model.check_scales(scales)
        else:
            with pytest.raises(ValueError, match="scale set"):
                model.check_scales(scales)


@pytest.mark.parametrize("method", METHODS)
def test_training_and_validation_scales_follow_the_row(method):
    trained = TRAINED_ON[method]
    assert train_scales_problem(method, trained) is None
    # validated after every epoch (and served by default) at what it trains on
    assert validation_scales(method, trained) == (trained if METHOD_TABLE[method].trains_on_several_scales else [1.0])
    wrong = [0.5, 1.0] if trained == [1.0] else [1.0]
    problem = train_scales_problem(method, wrong)
    assert problem is not None
    with pytest.raises(ConfigError, match="model.train_scales"):
        validate_config({"model": {"method": method, "train_scales": wrong}})


@pytest.mark.parametrize("method", METHODS)
def test_sets_sharing_their_scale_passes_fuse_as_each_set_alone(method):
    """forward_sets runs the segmenter once per distinct scale of all the sets (evaluation and the
    scale search ask for many sets of the same images); each set's output is the one it has alone."""
    import torch

    model = build_model(tiny_model_config(method=method, train_scales=TRAINED_ON[method])).eval()
    sets = PREDICTS_AT[method]
    passes = []
    model.segmenter.register_forward_hook(lambda _module, inputs, _output: passes.append(inputs[0].shape[-1]))
    image = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        shared = model.forward_sets(image, sets)
        assert len(passes) == len({s for scales in sets for s in scales})  # one pass per distinct scale
        for scales, output in zip(sets, shared, strict=True):
            alone = model(image, scales)
            assert torch.equal(output.fused, alone.fused), (method, scales)
            weights, alone_weights = output.scale_weights(), alone.scale_weights()
            assert weights.keys() == alone_weights.keys()
            assert all(torch.equal(weights[s], alone_weights[s]) for s in weights)
