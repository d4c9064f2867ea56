"""A search of the `tune` stage (pipeline/tune.py) runs in batches of samples: the first run of the
stage runs samples 0 .. tune.num_samples - 1; a later run with a larger tune.num_samples runs only
the samples the search does not have yet, as one more batch, and keeps the trials it has. (A
sample's drawn settings depend on its number alone: search_space.draw.) Each batch is a Tune
experiment of its own; the search's MLflow run records the batches that finished.
"""

from __future__ import annotations

import os

from components.config import PipelineConfig
from pipeline.runtime import capacity, tune_trials
from pipeline.runtime.common import verbose
from pipeline.runtime.search_space import search_space

SAMPLE_BATCHES_TAG = "hmsa.sample_batches"  # on the search's run: its sample count after each batch, "3,6"


def batch_name(search: str, samples: tuple[int, int]) -> str:
    """The Tune experiment of samples (first, end) of the search `search`."""
    return f"{search}-samples-{samples[0]}-{samples[1]}"


def finished_batches(parent) -> list[tuple[int, int]]:
    """The samples (first, end) of each finished batch of the search whose MLflow run is `parent`."""
    if parent is None:
        return []
    ends = [int(end) for end in (parent.data.tags.get(SAMPLE_BATCHES_TAG) or "").split(",") if end]
    return [((ends[i - 1] if i else 0), end) for i, end in enumerate(ends)]


def new_tuner(cfg: PipelineConfig, trainable, launch, search: str, samples: tuple[int, int]):
    """A Tune experiment for samples (first, end) of the search `search`."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    if not verbose():
        # Tune's newer output engine prints the experiment's heading (a table, where its results
        # are, a TensorBoard command) even at verbose=0, which its docstring calls silent; the
        # older engine, still Tune's own switch, prints nothing at 0. Read when the search starts.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    storage_path, storage_filesystem = launch.run_storage()
    # ASHA compares the trials of one batch of samples: a continued search's new trials among themselves.
    scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.tune.epochs, grace_period=cfg.tune.grace_period,
                              reduction_factor=cfg.tune.reduction_factor)
    concurrency = capacity.trainings_that_fit(cfg.ray, launch.use_gpu)  # trial drivers never wait for workers
    return tune.Tuner(
        trainable,
        param_space=search_space(cfg, *samples),  # one Tune sample: the samples are a grid key
        tune_config=tune.TuneConfig(metric="val_miou", mode="max", scheduler=scheduler, num_samples=1,
                                    # The generator enforces the limit (Tune ignores max_concurrent_trials
                                    # for a BasicVariantGenerator given here).
                                    search_alg=BasicVariantGenerator(max_concurrent=concurrency)),
        # A trial whose driver dies (a node lost, a Ray process crashing) restarts from its last
        # checkpoint instead of failing the search.
        run_config=tune.RunConfig(name=batch_name(search, samples), storage_path=storage_path,
                                  storage_filesystem=storage_filesystem,
                                  failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures),
                                  # Tune's own tables (a status table every 30 s, one per trial start and
                                  # end) were 40% of the main job's log: one line per trial start and end
                                  # instead; the epochs have their own lines.
                                  verbose=0, callbacks=[tune_trials.trial_lines(cfg.tune.epochs)]))
