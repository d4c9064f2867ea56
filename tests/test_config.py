"""Config errors name the key path and the value; cross-key rules are checked before anything runs."""

import pytest

from components.config import ConfigError, load_config, validate_config


def test_defaults_are_valid():
    cfg = validate_config({})
    assert cfg.model.method == "hierarchical" and cfg.model.train_scales == [0.5, 1.0]


def test_repository_params_file_is_valid():
    load_config("params.yaml")


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"model": {"train_scales": [0.5, -1.0, 1.0]}}, "model.train_scales"),
        ({"model": {"train_scales": [0.5, 0.5, 1.0]}}, "model.train_scales"),
        ({"model": {"train_scales": [0.5, 2.0]}}, "model.train_scales = [0.5, 2.0]"),
        ({"model": {"method": "avgpool", "train_scales": [0.5, 1.0]}}, "model.train_scales"),
        ({"model": {"methd": "single"}}, "model.methd: unknown key"),
        ({"model": {"method": "bilinear"}}, "model.method"),
        ({"train": {"lr": -0.1}}, "train.lr"),
        ({"evaluate": {"scale_sets": [[1.0], [0.5, 2.0]]}}, "evaluate.scale_sets[1] = [0.5, 2.0]"),
        (
            {"model": {"method": "explicit", "train_scales": [0.5, 1.0, 2.0]}, "evaluate": {"scale_sets": [[0.5, 1.0]]}},
            "evaluate.scale_sets[0]",
        ),
    ],
)
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    assert key in str(err.value)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  num_classes: one\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml[\s\S]*model.num_classes.*'one'"):
        load_config(wrong)


def test_every_ablation_entry_of_the_repository_params_is_valid():
    from components.config import METHODS, ablation_config

    cfg = load_config("params.yaml")
    for method in METHODS:
        run = ablation_config(cfg, method)
        assert run.model.method == method and run.evaluate.scale_sets == [cfg.ablation.methods[method].eval_scales]
