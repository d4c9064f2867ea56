"""Config errors name the key path and the value; cross-key rules are checked before anything runs."""

from pathlib import Path

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
        # names the workers would only fail on, after retries: refused at load, with the allowed values
        (
            {"model": {"trunk": "resnet101"}},
            "model.trunk: unknown name 'resnet101'; expected one of resnet18, resnet50, tiny",
        ),
        ({"model": {"decoder": "segformer"}}, "model.decoder: unknown name 'segformer'; expected one of deeplabv3plus"),
        # crops of 0 or fewer pixels used to train "successfully" on empty or 1-pixel crops
        ({"train": {"crop_size": [0, 64]}}, "train.crop_size[0]"),
        ({"train": {"crop_size": [64, -8]}}, "train.crop_size[1]"),
        ({"ablation": {"crop_size": [0, 0]}}, "ablation.crop_size"),
        ({"ablation": {"trunk": "vgg"}}, "ablation.trunk: unknown name 'vgg'; expected one of resnet18"),
        ({"ablation": {"output_stride": 4}}, "ablation.output_stride"),
        # outputs that overlap: one stage would wipe what another wrote
        ({"pyramid": {"output": "data/raw/synthetic"}}, "prepare.output = data/raw/synthetic and pyramid.output"),
        (
            {"train": {"metrics": "data/pyramid/synthetic/metrics.json"}},
            "pyramid.output = data/pyramid/synthetic and train.metrics",
        ),
        ({"evaluate": {"output_dir": "models/model/eval"}}, "train.output = models/model and evaluate.output_dir"),
        ({"evaluate": {"scale_sets": [[1.0], [0.5, 2.0]]}}, "evaluate.scale_sets[1] = [0.5, 2.0]"),
        (
            {
                "model": {"method": "explicit", "train_scales": [0.5, 1.0, 2.0]},
                "evaluate": {"scale_sets": [[0.5, 1.0]]},
            },
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
        # the table's own model size, when set; the model section's otherwise
        assert run.model.trunk == (cfg.ablation.trunk or cfg.model.trunk)
        assert run.model.output_stride == (cfg.ablation.output_stride or cfg.model.output_stride)
        assert run.loader.class_uniform == cfg.ablation.class_uniform != cfg.loader.class_uniform
    for row, entry in cfg.ablation.methods.items():  # rows named otherwise say which method they are
        assert ablation_config(cfg, row).model.method == (entry.method or row)
        assert ablation_config(cfg, row).train.output == f"{cfg.ablation.output_dir}/{row}/seed-0/model"


def test_an_ablation_row_not_named_after_a_method_must_name_it():
    from components.config import validate_config

    row = {"train_scales": [0.5, 1.0], "eval_scales": [0.5, 1.0]}
    with pytest.raises(ConfigError, match=r"ablation: .*methods.hier_pair: a row not named after a method needs"):
        validate_config({"ablation": {"methods": {"hier_pair": row}}}, source="params.yaml")
    with pytest.raises(ConfigError, match=r"ablation.methods.Hier.*pattern"):
        validate_config({"ablation": {"methods": {"Hier": {**row, "method": "hierarchical"}}}}, source="params.yaml")
    cfg = validate_config({"ablation": {"methods": {"hier_pair": {**row, "method": "hierarchical"}}}}, source="x")
    assert cfg.ablation.method_of("hier_pair") == "hierarchical"


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"ray": {"address": "10.0.0.1:6379"}}, "ray.address: is environment now, not a param: set RAY_ADDRESS"),
        ({"ray": {"storage_path": "s3://b/p"}}, "ray.storage_path: is environment now, not a param: set HMSA_STORAGE"),
        ({"mlflow": {"tracking_uri": "http://x"}}, "mlflow.tracking_uri: is environment now, not a param: set MLFLOW_"),
        ({"storage": {"s3_endpoint_url": "http://x"}}, "storage: is environment now, not a param: set AWS_ENDPOINT"),
    ],
)
def test_cluster_settings_are_environment_not_params(raw, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(raw)


def test_stage_outputs_are_local_paths_dvc_can_cache():
    with pytest.raises(ConfigError, match=r"pyramid.output: an output of a stage is a local path"):
        validate_config({"pyramid": {"output": "s3://bucket/pyramid"}})


@pytest.mark.parametrize("workers, ok", [(2, True), ([1, 2], True), ([2, 1], False), ([0, 2], False), (0, False)])
def test_worker_count_or_elastic_range(workers, ok):
    if ok:
        low, high = validate_config({"ray": {"num_workers": workers}}).ray.worker_range
        assert (low, high) == ((workers, workers) if isinstance(workers, int) else tuple(workers))
    else:
        with pytest.raises(ConfigError, match="ray.num_workers"):
            validate_config({"ray": {"num_workers": workers}})


def test_no_stage_lists_a_cluster_setting_as_a_param():
    """Pointing the checkout at a cluster, bucket or tracking server must invalidate no stage."""
    import yaml

    stages = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    cfg = load_config("params.yaml")
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        for param in stage.get("params", []):
            assert param.split(".")[0] != "storage", (name, param)
            assert param != "mlflow", (name, param)  # only mlflow.experiment shapes where results are filed
    assert "address" not in cfg.ray.model_dump()


def test_config_names_of_trunks_and_decoders_are_the_registries():
    from components.config import DECODER_NAMES, TRUNK_NAMES
    from components.models.decoders import DECODERS
    from components.models.trunks import TRUNKS

    assert set(TRUNK_NAMES) == set(TRUNKS) and set(DECODER_NAMES) == set(DECODERS)


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "params.yaml"
    bad.write_text("model:\n  trunk: resnet101\n")
    command = [sys.executable, "-m", "pipeline.prepare", "--params", str(bad)]
    plain = subprocess.run(command, capture_output=True, text=True)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.startswith("error: invalid configuration in") and "model.trunk" in plain.stderr
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            {"train": {"crop_size": [190, 190]}, "tune": {"train_scale_sets": {"s075_10": [0.75, 1.0]}}},
            "train.crop_size = [190, 190]: with tune.train_scale_sets.s075_10 [0.75, 1.0] "
            "a crop must be a multiple of 4",
        ),
        ({"ablation": {"crop_size": [129, 129]}}, "ablation.crop_size = [129, 129]: with ablation.methods."),
        (
            {"model": {"train_scales": [0.7, 1.0]}, "train": {"crop_size": [64, 64]}},
            "train.crop_size = [64, 64]: with model.train_scales [0.7, 1.0] a crop must be a multiple of 10",
        ),
        ({"model": {"train_scales": [0.123456789, 1.0]}}, "is not a ratio of small whole numbers"),
    ],
)
def test_crops_must_be_whole_pixels_at_every_training_scale(raw, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        validate_config(raw)
