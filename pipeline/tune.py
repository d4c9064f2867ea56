"""Stage `tune`: Ray Tune searches training scale sets and hyperparameters (the inference scale
sets of a trained model are the `eval-scales` stage, pipeline/eval_scales.py).

    python -m pipeline.tune        # tune.trials (one row per trial) and tune.best

Each trial is a driver function that builds and fits the same TorchTrainer as the `train` stage
(pipeline.runtime.trainer.build_trainer) and reports to Tune through TuneReportCallback; ASHA stops weak
trials early. Every trial is an MLflow run nested under one parent run for the search, and ends
with its real status (FINISHED, KILLED when ASHA stopped it, FAILED). The search is named after its
code, config and data: running the stage again after an interruption restores it; after a
completed search it is reused (and says so); after any change a new search starts.
"""

from __future__ import annotations

import csv

import yaml

from components.atomic import atomic_file
from components.config import SEARCH_KEYS, SEARCHABLE, PipelineConfig
from components.data.pyramid import PyramidReader
from pipeline.runtime import capacity, cluster, leftovers, output_files, tracking, tune_trials
from pipeline.runtime.common import ctrl_c_stays_an_interrupt, run_stage
from pipeline.runtime.launch import prepare_launch
from pipeline.runtime.search_space import check_search_space, search_space, trial_config


def search_key(cfg: PipelineConfig, dataset_fingerprint: str) -> str:
    """The search's identity: what its trials compute, i.e. the base config under the trial budget
    (tune.epochs, not train.epochs) and the search's own keys (SEARCH_KEYS; the inference-scale
    candidates are another stage's). Same key: a finished search is reused, an interrupted one resumed."""
    searched = cfg.tune.model_dump(mode="json", include=set(SEARCH_KEYS))
    return cluster.run_key(trial_config(cfg, {}, "budget"), f"{dataset_fingerprint}:tune:{searched!r}")


def search(cfg: PipelineConfig) -> list[dict]:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    check_search_space(cfg)
    manifest = PyramidReader(cfg.pyramid.output).manifest
    launch = prepare_launch(cfg)
    name = f"tune-{search_key(cfg, manifest['source_manifest'])}"
    experiment_id = tracking.setup_experiment(launch.env, cfg.mlflow.experiment)
    finished = tracking.finished_run(experiment_id, name)
    parent_run_id = finished.info.run_id if finished else tracking.find_or_create_run(
        experiment_id, name, name, {"stage": "tune"})
    setup = {"key": name, "name": name, "launch": launch, "experiment_id": experiment_id,
             "parent_run_id": parent_run_id}
    # The driver only coordinates; its Train workers hold the CPUs/GPUs. A trial must request
    # something, so it asks for a token amount of memory and no CPU (else it would block its workers).
    trainable = tune.with_resources(tune.with_parameters(tune_trials.driver, base=cfg, setup=setup),
                                    tune.PlacementGroupFactory([{"CPU": 0, "memory": 2**20}]))
    storage_path, storage_filesystem = launch.run_storage()
    path = f"{storage_path.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path, storage_filesystem=storage_filesystem):
        print(f"reusing the finished search at {path}: same code, config and data" if finished else
              f"resuming the interrupted search at {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=storage_filesystem)
    else:
        scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.tune.epochs, grace_period=cfg.tune.grace_period,
                                  reduction_factor=cfg.tune.reduction_factor)
        concurrency = capacity.trainings_that_fit(cfg.ray, launch.use_gpu)  # trial drivers never wait for workers
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg),
            tune_config=tune.TuneConfig(metric="val_miou", mode="max", scheduler=scheduler,
                                        num_samples=cfg.tune.num_samples,
                                        # The generator enforces the limit (Tune ignores
                                        # max_concurrent_trials for a BasicVariantGenerator given here).
                                        search_alg=BasicVariantGenerator(random_state=cfg.tune.seed,
                                                                         max_concurrent=concurrency)),
            # A trial whose driver dies (a node lost, a Ray process crashing) restarts from its last
            # checkpoint instead of failing the search.
            run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                                      failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures),
                                      # Tune's own tables (a status table every 30 s, one per trial
                                      # start and end) were 40% of the main job's log: one line per
                                      # trial start and end instead; the epochs have their own lines.
                                      verbose=0, callbacks=[tune_trials.trial_lines(cfg.tune.epochs)]),
        )
    with tracking.run_status(parent_run_id):
        # Trials are stopped while their training runs; what a stopped trial's training leaves must
        # not hold the resources the next trials wait for (pipeline.runtime.leftovers).
        try:
            with leftovers.LeftoverReaper(), ctrl_c_stays_an_interrupt():
                results = tuner.fit()
        except KeyboardInterrupt:  # the search resumes on the next run; its trials stopped now
            tune_trials.mark_running_trials_killed(experiment_id, parent_run_id)
            raise
        rows = tune_trials.finish_trials(cfg, experiment_id, parent_run_id, results)
        from mlflow import MlflowClient

        MlflowClient().set_tag(parent_run_id, tracking.COMPLETE_TAG, "true")
    return rows


def write_search_outputs(cfg: PipelineConfig, rows: list[dict]) -> dict:
    finished = [r for r in rows if not r["failed"] and r["epochs"]]
    if not finished:
        raise RuntimeError(f"every one of the {len(rows)} trials failed; see the Ray logs above")
    best = max(finished, key=lambda r: r["best_val_miou"])
    with atomic_file(cfg.tune.trials, output_files.TRIALS) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    chosen = {k: best[k] for k in SEARCHABLE if k in best}
    document = {"trial": best["trial"], "best_val_miou": best["best_val_miou"], "settings": chosen,
                "train_scales": best["train_scale_list"]}
    with atomic_file(cfg.tune.best, output_files.BEST_TRIAL) as handle:
        yaml.safe_dump(document, handle, sort_keys=False)
    return document


def main(cfg: PipelineConfig) -> None:
    output_files.check_files(output_files.tune_files(cfg))  # a refusal now, not after the search
    best = write_search_outputs(cfg, search(cfg))
    print(f"best trial {best['trial']}: val mIoU {best['best_val_miou']:.4f} with {best['settings']}")


if __name__ == "__main__":
    run_stage(main, __doc__)
