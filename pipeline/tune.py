"""Stage `tune`: Ray Tune searches training scale sets and hyperparameters (the inference scale
sets of a trained model are the `eval-scales` stage, pipeline/eval_scales.py).

    python -m pipeline.tune        # tune.trials (one row per trial) and tune.best

Each trial is a driver function that builds and fits the same TorchTrainer as the `train` stage
(pipeline.runtime.trainer.build_trainer) and reports to Tune through TuneReportCallback; ASHA stops weak
trials early. Every trial is an MLflow run nested under one parent run for the search, and ends
with its real status (FINISHED, KILLED when ASHA stopped it, FAILED). The search is named after its
code, config and data: running the stage again after an interruption restores it; after a
completed search it is reused (and says so); a larger tune.num_samples continues it with the new
samples only (pipeline/runtime/search_batches.py); after any other change a new search starts.
"""

from __future__ import annotations

import csv

import yaml

from components.atomic import atomic_file
from components.config import SEARCH_KEYS, SEARCHABLE, PipelineConfig
from components.data.pyramid import PyramidReader
from pipeline.runtime import cluster, leftovers, output_files, search_batches, tracking, tune_trials
from pipeline.runtime.common import ctrl_c_stays_an_interrupt, run_stage
from pipeline.runtime.errors import SearchFailedError
from pipeline.runtime.launch import prepare_launch
from pipeline.runtime.search_space import check_search_space, search_space, trial_config


def search_key(cfg: PipelineConfig, dataset_fingerprint: str) -> str:
    """The search's identity: what its trials compute, i.e. the base config under the trial budget
    (tune.epochs, not train.epochs) and the search's own keys (SEARCH_KEYS; the inference-scale
    candidates are another stage's). Same key: a finished search is reused, an interrupted one resumed.
    tune.num_samples is not part of it: more samples continue the search (search_space.draw)."""
    searched = cfg.tune.model_dump(mode="json", include=set(SEARCH_KEYS) - {"num_samples"})
    return cluster.run_key(trial_config(cfg, {}, "budget"), f"{dataset_fingerprint}:tune:{searched!r}")


def search(cfg: PipelineConfig) -> list[dict]:
    """Run the samples the search does not have yet (all of them the first time), as one more batch,
    and return a row for each trial of samples 0 .. tune.num_samples - 1."""
    from mlflow import MlflowClient
    from ray import tune

    check_search_space(cfg)
    manifest = PyramidReader(cfg.pyramid.output).manifest
    launch = prepare_launch(cfg)
    name = f"tune-{search_key(cfg, manifest['source_manifest'])}"
    experiment_id = tracking.setup_experiment(launch.env, cfg.mlflow.experiment)
    batches = search_batches.finished_batches(tracking.run_with_key(experiment_id, name))
    done, wanted = (batches[-1][1] if batches else 0), cfg.tune.num_samples
    parent_run_id = tracking.find_or_create_run(experiment_id, name, name, {"stage": "tune"})
    setup = {"key": name, "name": name, "launch": launch, "experiment_id": experiment_id,
             "parent_run_id": parent_run_id}
    # The driver only coordinates; its Train workers hold the CPUs/GPUs. A trial must request
    # something, so it asks for a token amount of memory and no CPU (else it would block its workers).
    trainable = tune.with_resources(tune.with_parameters(tune_trials.driver, base=cfg, setup=setup),
                                    tune.PlacementGroupFactory([{"CPU": 0, "memory": 2**20}]))
    storage_path, storage_filesystem = launch.run_storage()

    def path(samples: tuple[int, int]) -> str:
        return f"{storage_path.rstrip('/')}/{search_batches.batch_name(name, samples)}"

    def restored(samples: tuple[int, int]):
        return tune.Tuner.restore(path(samples), trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=storage_filesystem,
                                  # its trials not made yet draw their settings with the same functions
                                  param_space=search_space(cfg, *samples))

    results = [result for samples in batches if samples[0] < wanted for result in restored(samples).get_results()]
    where = f"{storage_path.rstrip('/')}/{name}-samples-*"  # its batches' folders
    with tracking.run_status(parent_run_id):
        if wanted <= done:
            print(f"reusing the finished search at {where}: same code, config and data ({done} samples)")
        else:
            if tune.Tuner.can_restore(path((done, wanted)), storage_filesystem=storage_filesystem):
                print(f"resuming the interrupted search at {where}")
                tuner = restored((done, wanted))
            else:
                if done:
                    print(f"continuing the finished search of {done} samples at {where}: samples {done + 1} to "
                          f"{wanted}")
                tuner = search_batches.new_tuner(cfg, trainable, launch, name, (done, wanted))
            # Trials are stopped while their training runs; what a stopped trial's training leaves
            # must not hold the resources the next trials wait for (pipeline.runtime.leftovers).
            try:
                with leftovers.LeftoverReaper(), ctrl_c_stays_an_interrupt():
                    results += list(tuner.fit())
            except KeyboardInterrupt:  # the search resumes on the next run; its trials stopped now
                tune_trials.mark_running_trials_killed(experiment_id, parent_run_id)
                raise
            ends = [end for _, end in batches] + [wanted]
            MlflowClient().set_tag(parent_run_id, search_batches.SAMPLE_BATCHES_TAG, ",".join(map(str, ends)))
        rows = tune_trials.finish_trials(cfg, experiment_id, parent_run_id, results)
        MlflowClient().set_tag(parent_run_id, tracking.COMPLETE_TAG, "true")
    return [row for row in rows if row["sample"] < wanted]


def write_search_outputs(cfg: PipelineConfig, rows: list[dict]) -> dict:
    finished = [r for r in rows if not r["failed"] and r["epochs"]]
    if not finished:
        reasons = "; ".join(sorted({row["failure"] for row in rows if row["failure"]})) or "see the log above"
        raise SearchFailedError(f"every one of the {len(rows)} trials failed: {reasons}")
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
