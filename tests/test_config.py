"""Config errors name the key path and the value; cross-key rules are checked before anything runs."""

from pathlib import Path

import pytest
import yaml

from components.config import ConfigError, load_config, validate_config


def test_defaults_are_valid():
    cfg = validate_config({})
    assert cfg.model.method == "hierarchical" and cfg.model.train_scales == [0.5, 1.0]


def test_repository_params_file_is_valid():
    load_config("params.yaml")


def test_the_schema_defaults_are_params_yaml():
    """params.yaml is the one source of values: the config that code, tests and benchmarks build
    without a params file (`validate_config({})`) is the one `make repro` runs."""
    def differences(default, repository, path=""):
        if isinstance(default, dict) and isinstance(repository, dict):
            return [d for key in sorted(set(default) | set(repository))
                    for d in differences(default.get(key), repository.get(key), f"{path}.{key}".lstrip("."))]
        return [] if default == repository else [f"{path}: schema {default!r}, params.yaml {repository!r}"]

    assert differences(validate_config({}).model_dump(mode="json"),
                       load_config("params.yaml").model_dump(mode="json")) == []


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
        ({"evaluate": {"output_dir": "models/hmsa/eval"}}, "train.output = models/hmsa and evaluate.output_dir"),
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


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"tune": {"eval_scale_sets": {"s10": [1.0]}}}, "tune.eval_scale_sets: moved to eval_scales.scale_sets"),
        ({"tune": {"max_eval_gflops": 5.0}}, "tune.max_eval_gflops: moved to eval_scales.max_gflops"),
        ({"tune": {"output_dir": "results/tune"}}, "tune.output_dir: moved to tune.trials and tune.best"),
    ],
)
def test_a_key_that_moved_in_params_names_its_new_place(raw, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(raw)


def test_every_inference_scale_candidate_is_a_set_the_trained_method_can_serve():
    """Refused at load, not by the eval-scales stage after the training; unless the search picks the
    method (then the trained method is known only after it)."""
    single = {"model": {"method": "single", "train_scales": [1.0]}, "evaluate": {"scale_sets": [[1.0]]}}
    with pytest.raises(ConfigError, match=r"eval_scales.scale_sets.s05_10 = \[0.5, 1.0\]: method 'single' predicts"):
        validate_config(single)
    validate_config({**single, "eval_scales": {"scale_sets": {"s10": [1.0]}}})
    searched = {"method": {"choice": ["single", "hierarchical"]}}
    validate_config({**single, "tune": {"search": searched}})


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


@pytest.mark.parametrize("written, meant", [("on", True), ("off", False), ("'on'", True), ('"Off"', False),
                                            ("true", True), ("auto", "auto"), ("'auto'", "auto")])
def test_switches_take_auto_on_or_off_however_the_yaml_writes_them(written, meant):
    """train.compile and ray.use_gpu: PyYAML reads a plain on/off as a boolean, a quoted one (or
    JSON, or a YAML 1.2 tool's output) as a string; both mean the same."""
    raw = yaml.safe_load(f"train: {{compile: {written}}}\nray: {{use_gpu: {written}}}")
    cfg = validate_config(raw)
    assert cfg.train.compile == meant and cfg.ray.use_gpu == meant


@pytest.mark.parametrize("bad", ["sometimes", 2, None])
def test_a_switch_that_is_not_auto_on_or_off_names_the_key_and_the_choices(bad):
    with pytest.raises(ConfigError, match=r"train.compile: should be auto, on or off \(got "):
        validate_config({"train": {"compile": bad}})


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


def _float_leaves(tree, path=""):
    """(key path, value) of every float in a parsed params tree, list items as key[i]."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _float_leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _float_leaves(value, f"{path}[{i}]")
    elif isinstance(tree, float):
        yield path, tree


def _set_leaf(tree, path: str, value) -> None:
    import re

    parts = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]
    for part in parts[:-1]:
        tree = tree[part]
    tree[parts[-1]] = value


REPOSITORY_PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"
FLOAT_KEYS = [path for path, _ in _float_leaves(yaml.safe_load(REPOSITORY_PARAMS.read_text()))]


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
def test_every_float_of_the_params_file_must_be_finite(bad):
    """Every float the repository's params.yaml holds, set to inf or nan, is refused naming its key
    (`train.lr: .inf` used to train on NaN losses until Ray gave up; `ray.cpus_per_worker: .inf`
    asked the cluster for infinite CPUs)."""
    import copy

    base = yaml.safe_load(REPOSITORY_PARAMS.read_text())
    assert len(FLOAT_KEYS) > 20  # the walk reaches the file's floats
    for path in [*FLOAT_KEYS, "ray.cpus_per_worker", "ray.gpus_per_worker"]:
        raw = copy.deepcopy(base)
        _set_leaf(raw, path, bad)
        with pytest.raises(ConfigError) as err:
            validate_config(raw)
        named = [line.strip().split(":")[0] for line in str(err.value).splitlines()[1:]]
        assert any(path.startswith(key) for key in named), (path, str(err.value))


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"train": {"seed": -1}}, "train.seed: Input should be greater than or equal to 0"),
        ({"train": {"seed": 2**40}}, "train.seed: Input should be less than 4294967296"),
        ({"ablation": {"seeds": [0, -3]}}, "ablation.seeds[1]"),
        ({"tune": {"seed": -1}}, "tune.seed"),
        ({"prepare": {"synthetic": {"seed": -1}}}, "prepare.synthetic.seed"),
        ({"loader": {"workers": 100000}}, "loader.workers: Input should be less than or equal to 64"),
        ({"prepare": {"synthetic": {"height": 200000}}}, "prepare.synthetic.height"),
        ({"prepare": {"synthetic": {"train_images": 10**9}}}, "prepare.synthetic.train_images"),
        ({"evaluate": {"scale_sets": []}}, "evaluate.scale_sets: List should have at least 1 item"),
        ({"eval_scales": {"scale_sets": {}}}, "eval_scales.scale_sets: Dictionary should have at least 1 item"),
        ({"tune": {"search": {"lr": {"loguniform": [0.1, 0.01]}}}}, "tune.search.lr: loguniform = [0.1, 0.01]"),
        ({"tune": {"search": {"lr": {"uniform": [0.1, 0.1]}}}}, "tune.search.lr: uniform = [0.1, 0.1]"),
        ({"tune": {"search": {"lr": {"loguniform": [0.0, 0.1]}}}}, "a log scale needs low > 0"),
        ({"tune": {"search": {"lr": {"choice": []}}}}, "tune.search.lr.choice: List should have at least 1 item"),
        ({"tune": {"search": {"lr": {"grid": [0.1, float("inf")]}}}}, "tune.search.lr: values must be finite"),
        ({"mlflow": {"experiment": ""}}, "mlflow.experiment: String should have at least 1 character"),
        ({"register": {"model_name": "team/hmsa"}}, "register.model_name: String should match pattern"),
        ({"loader": {"workers": "x"}}, "loader.workers: Input should be"),  # no union member in the key
        ({"model": {"trunk-x": 1}}, "model.trunk-x: unknown key"),  # a key that is not an identifier is kept
        ({"tune": {"train_scale_sets": {"s05-10": [0.5, -1.0]}}}, "tune.train_scale_sets.s05-10: scales must be"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    assert message in str(err.value), str(err.value)
    assert "constrained-int" not in str(err.value) and "literal[" not in str(err.value)


def test_a_batch_larger_than_a_workers_share_of_the_data_is_refused(tmp_path):
    """With whole batches only, a batch larger than a worker's share of the training split trained
    nothing: the stage ended at once and recorded an untrained model as done."""
    from pipeline.runtime.launch import check_full_batches
    from tests.train_helpers import tiny_pyramid

    pyramid = str(tiny_pyramid(tmp_path, train_images=5, val_images=1) / "pyramid")
    check_full_batches(validate_config({"train": {"batch_size": 5}}), pyramid)  # one worker, one batch
    check_full_batches(validate_config({"train": {"batch_size": 3}, "ray": {"num_workers": 2}}), pyramid)
    with pytest.raises(ConfigError, match=r"train.batch_size = 6, but each of 1 worker\(s\) .* gets 5 of the 5 "
                                          r"training images at .*: not one full batch; set train.batch_size to "
                                          r"at most 5$"):
        check_full_batches(validate_config({"train": {"batch_size": 6}}), pyramid)
    # an elastic run is checked at its largest size, where each worker's share is smallest
    with pytest.raises(ConfigError, match=r"each of 2 worker\(s\) .* gets 3 of the 5 .* or use fewer workers"):
        check_full_batches(validate_config({"train": {"batch_size": 4}, "ray": {"num_workers": [1, 2]}}), pyramid)


def test_outputs_are_compared_where_they_land_not_as_spelt(tmp_path, monkeypatch):
    """`prepare.output` relative and `pyramid.output` absolute for one folder, or through a link,
    let `pyramid` replace the prepared dataset."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere").symlink_to(tmp_path / "data")
    for spelt in (str(tmp_path / "data" / "raw"), "./data/../data/raw", "elsewhere/raw"):
        with pytest.raises(ConfigError, match=rf"prepare.output = data/raw and pyramid.output = {spelt} overlap"):
            validate_config({"prepare": {"output": "data/raw"}, "pyramid": {"output": spelt}})


@pytest.mark.parametrize("key, value", [
    ("train.metrics", "params.yaml"), ("train.run_record", ".git/config"), ("register.output", "dvc.yaml"),
    ("train.curves", "sub/../dvc.lock"), ("tune.best", ".dvc/tmp"), ("train.output", ".git"),
])
def test_outputs_on_the_repositorys_own_files_are_refused_at_load(key, value):
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"{key} = {value}: .*(inside \.(git|dvc)/|repository's own)"):
        validate_config({section: {name: value}})


def test_an_output_on_the_params_file_itself_is_refused_whatever_its_name(tmp_path):
    params = tmp_path / "my-params.yml"
    params.write_text(yaml.safe_dump({"train": {"metrics": str(params)}}))
    with pytest.raises(ConfigError, match="train.metrics = .*my-params.yml: is the params file being read"):
        load_config(params)


def test_an_output_name_too_long_for_its_temporaries_or_below_a_file_is_refused_at_load(tmp_path, monkeypatch):
    """Both used to end in a traceback once the stage ran (ENAMETOOLONG on the temporary's name, whose
    name is longer than the output's; `[Errno 17] File exists` for a folder below a file)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine\n")
    with pytest.raises(ConfigError, match=r"prepare.output = a{240}: its name is 240 bytes; .* at most 231"):
        validate_config({"prepare": {"output": "a" * 240}})
    validate_config({"prepare": {"output": "a" * 231}})
    with pytest.raises(ConfigError, match="train.metrics = notes.txt/metrics.json: notes.txt is a file, not a folder"):
        validate_config({"train": {"metrics": "notes.txt/metrics.json"}})
