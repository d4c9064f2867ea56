"""What `tune` searches and how a trial's settings become a config; shared by `tune` and `train`
(which trains the best trial's settings), so neither stage imports the other."""

from __future__ import annotations

import functools
import math
import zlib
from pathlib import Path

import numpy as np
import yaml

from components.config import PipelineConfig, SearchSpec, with_overrides


def trial_config(cfg: PipelineConfig, settings: dict, trial: str) -> PipelineConfig:
    """The full config of one trial: searched settings and the trial budget over the base config."""
    model, train = {}, {"epochs": cfg.tune.epochs, "steps_per_epoch": cfg.tune.steps_per_epoch}
    if "train_scales" in settings:
        model["train_scales"] = cfg.tune.train_scale_sets[settings["train_scales"]]
    for key, section in (("method", model), ("aux_scale_weight", model), ("lr", train), ("crop_size", train)):
        if key in settings:
            section[key] = list(settings[key]) if key == "crop_size" else settings[key]
    return with_overrides(cfg, {"model": model, "train": train, "tune": {"apply_to_train": False}},
                          source=f"tune trial {trial}")


SAMPLE = "sample"  # a trial's sample number, in its config beside the searched settings


def draw(spec: SearchSpec, key: str, seed: int, sample: int):
    """The value of a sampled (not grid) key in sample `sample`: a function of tune.seed, the sample
    number and the key alone. The first samples of a larger search are then the samples of a smaller
    one, so extending tune.num_samples continues a finished search instead of drawing anew."""
    rng = np.random.default_rng([seed, sample, zlib.crc32(key.encode())])
    if spec.choice is not None:
        return spec.choice[int(rng.integers(len(spec.choice)))]
    if spec.loguniform is not None:
        low, high = spec.loguniform
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    assert spec.uniform is not None
    return float(rng.uniform(*spec.uniform))


def _drawn_for_trial(spec: SearchSpec, key: str, seed: int, config: dict) -> object:
    return draw(spec, key, seed, config[SAMPLE])  # Tune resolves the grid keys first


def check_search_space(cfg: PipelineConfig) -> None:
    """Validate a trial config for every discrete combination before any trial starts."""
    discrete = {k: (s.choice or s.grid) for k, s in cfg.tune.search.items() if (s.choice or s.grid)}
    combos = [{}]
    for key, values in discrete.items():
        combos = [{**c, key: v} for c in combos for v in values]
    for combo in combos:
        trial_config(cfg, combo, f"settings {combo}")


def search_space(cfg: PipelineConfig, first_sample: int, end_sample: int) -> dict:
    """Tune's param_space for samples first_sample .. end_sample - 1 of tune.search: every grid
    value in every sample (as Tune's num_samples does), the sampled keys drawn per sample (draw())."""
    from ray import tune

    space: dict = {SAMPLE: tune.grid_search(list(range(first_sample, end_sample)))}
    for key, spec in cfg.tune.search.items():
        space[key] = (tune.grid_search(spec.grid) if spec.grid is not None else
                      tune.sample_from(functools.partial(_drawn_for_trial, spec, key, cfg.tune.seed)))
    return space


def apply_best(cfg: PipelineConfig) -> PipelineConfig:
    """The train stage's config with the best trial's settings (tune.apply_to_train)."""
    path = Path(cfg.tune.best)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the tune stage first, or set tune.apply_to_train: false")
    settings = yaml.safe_load(path.read_text())["settings"]
    tuned = trial_config(cfg, settings, str(path))
    # Keep the train stage's own budget; take only the searched settings.
    return with_overrides(tuned, {"train": {"epochs": cfg.train.epochs,
                                            "steps_per_epoch": cfg.train.steps_per_epoch}}, source=str(path))
