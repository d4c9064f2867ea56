"""Which edits of params.yaml rerun the costly stages (the search, the training, the ablation's
trainings), read from dvc.yaml's params lists as DVC reads them (a section reruns a stage on any of
its keys), and which change a training's or a search's identity (a finished one is reused).

A search or a training reruns only when what it computes changes: never for where it writes, how
it survives faults, how many loader processes it runs or where it logs
(components.config.OPERATIONAL_KEYS), nor for another stage's keys. An edit also reruns the stages
whose data inputs it changes (`pyramid.scales` rebuilds the pyramid, and all that reads it): DVC
follows the data, this table the params."""

from __future__ import annotations

import pytest
import yaml

from components.config import OPERATIONAL_KEYS, SEARCH_KEYS, PipelineConfig, validate_config, with_overrides
from tests.dvc_helpers import ROOT

COSTLY = ("tune", "train", "ablation-run")

# An edit of the key (alone) -> the costly stages DVC reruns for it.
RERUNS: dict[str, set[str]] = {
    # what a training computes
    "model.method": {"tune", "train", "ablation-run"},
    "train.lr": {"tune", "train", "ablation-run"},
    "train.batch_size": {"tune", "train", "ablation-run"},
    "loader.flip": {"tune", "train", "ablation-run"},
    "ray.num_workers": {"tune", "train", "ablation-run"},  # the global batch
    "train.epochs": {"train"},  # trials train tune.epochs, the ablation ablation.epochs
    "train.steps_per_epoch": {"train", "ablation-run"},
    "train.crop_size": {"tune", "train"},  # the ablation has its own
    "train.seed": {"tune", "train"},  # the ablation trains ablation.seeds
    "loader.random_scales": {"tune", "train"},  # the ablation has its own
    "pyramid.output": {"tune", "train", "ablation-run"},  # the data read
    # the search's own keys, and what the train stage takes from the search
    "tune.num_samples": {"tune"},
    "tune.epochs": {"tune"},
    "tune.search": {"tune"},
    "tune.apply_to_train": {"train"},
    "tune.best": {"tune", "train"},  # tune writes it, train reads it
    "tune.trials": {"tune"},
    "ablation.epochs": {"ablation-run"},
    # where the training writes: its own outputs only
    "train.output": {"train"},
    "train.metrics": {"train"},
    "train.curves": {"train"},
    "train.run_record": {"train"},
    # fault tolerance, speed and logging: nothing
    "ray.max_failures": set(),
    "ray.max_start_failures": set(),
    "ray.checkpoints_to_keep": set(),
    "ray.placement_strategy": set(),
    "ray.elastic_resize_interval_s": set(),
    "ray.scale_up_timeout_s": set(),
    "loader.workers": set(),
    "mlflow.experiment": set(),
    # inference only: the inference-scale search, evaluation and registration rerun, no training
    "eval_scales.scale_sets": set(),
    "eval_scales.max_gflops": set(),
    "eval_scales.recommendation": set(),
    "evaluate.scale_sets": set(),
    "register.min_delta": set(),
    "register.bootstrap_rounds": set(),
}


def stage_params() -> dict[str, list[str]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: (stage.get("do", stage)).get("params", []) for name, stage in stages.items()}


def reruns(key: str, params: dict[str, list[str]]) -> set[str]:
    """The stages whose params list names `key` or a section above it."""
    return {name for name, entries in params.items()
            if any(key == entry or key.startswith(f"{entry}.") for entry in entries if isinstance(entry, str))}


@pytest.mark.parametrize("key", sorted(RERUNS))
def test_an_edit_reruns_the_costly_stages_of_the_table(key):
    assert reruns(key, stage_params()) & set(COSTLY) == RERUNS[key]


def every_key() -> list[str]:
    cfg = validate_config({})
    return [f"{section}.{field}" for section in PipelineConfig.model_fields
            for field in type(getattr(cfg, section)).model_fields]


def test_every_setting_reruns_the_training_exactly_when_it_changes_what_is_trained():
    """Beyond the table, every key of the schema: an operational key reruns no costly stage (but the
    training's own output paths rerun it); a training setting reruns the train stage."""
    params = stage_params()
    own_outputs = {f"train.{name}" for name in OPERATIONAL_KEYS["train"]}
    for key in every_key():
        section, field = key.split(".")
        stages = reruns(key, params) & set(COSTLY)
        if field in OPERATIONAL_KEYS.get(section, ()):
            assert stages == ({"train"} if key in own_outputs else set()), key
        elif section in ("model", "train", "loader") or key == "ray.num_workers":
            assert "train" in stages, f"{key} changes the training but does not rerun the train stage"
        if section == "tune":
            assert ("tune" in stages) == (field in SEARCH_KEYS or field in ("trials", "best")), key


def config(**sections) -> PipelineConfig:
    return with_overrides(validate_config({}), sections, source="test")


@pytest.mark.parametrize("section, field, value", [
    ("train", "output", "elsewhere/model"), ("train", "curves", "elsewhere/curves.csv"),
    ("loader", "workers", 3), ("ray", "max_failures", 7), ("ray", "checkpoints_to_keep", 5),
    ("ray", "placement_strategy", "SPREAD"), ("mlflow", "experiment", "another"),
])
def test_an_operational_setting_keeps_the_identity_of_the_training_and_of_the_search(section, field, value):
    from pipeline.runtime.cluster import run_key
    from pipeline.tune import search_key

    base, edited = config(), config(**{section: {field: value}})
    assert run_key(edited, "data") == run_key(base, "data")
    assert search_key(edited, "data") == search_key(base, "data")


@pytest.mark.parametrize("sections, training, search", [
    ({"train": {"lr": 0.05}}, True, True),
    ({"train": {"epochs": 3}}, True, False),  # trials train tune.epochs
    ({"tune": {"epochs": 5}}, False, True),
    ({"tune": {"num_samples": 7}}, False, False),  # more samples continue the search (search_batches.py)
    ({"eval_scales": {"max_gflops": 50.0}}, False, False),  # the inference-scale search's
    ({"eval_scales": {"scale_sets": {"s10": [1.0]}}}, False, False),
])
def test_what_changes_the_computation_changes_the_identity(sections, training, search):
    from pipeline.runtime.cluster import run_key
    from pipeline.tune import search_key

    base, edited = config(), config(**sections)
    assert (run_key(edited, "data") != run_key(base, "data")) == training
    assert (search_key(edited, "data") != search_key(base, "data")) == search


def test_the_train_stage_takes_the_best_trial_from_tune_best(tmp_path, monkeypatch):
    """tune.best is an output of `tune` that `train` reads: its settings go over params.yaml (and the
    file is not mistaken for the params file, which no output may replace)."""
    from pipeline.runtime.search_space import apply_best

    monkeypatch.chdir(tmp_path)
    cfg = validate_config(yaml.safe_load((ROOT / "params.yaml").read_text()))
    best = tmp_path / cfg.tune.best
    best.parent.mkdir(parents=True)
    best.write_text(yaml.safe_dump({"trial": "t1", "settings": {"lr": 0.02, "train_scales": "s075_10"}}))
    tuned = apply_best(cfg)
    assert tuned.train.lr == 0.02 and tuned.model.train_scales == [0.75, 1.0]
    assert tuned.train.epochs == cfg.train.epochs  # the train stage's own budget, not the trials'
