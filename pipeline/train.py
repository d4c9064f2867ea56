"""Stage `train`: the training run (pipeline/runtime/training_run.py) of params.yaml, or of the best trial
of the search when tune.apply_to_train is set.

Writes the best epoch's saved model (train.output), results/train/metrics.json and curves.csv, and
logs one MLflow run per training with the model as a pyfunc. The run is named after its code,
config and data: running the stage again after a crash resumes from the last checkpoint; after a
completed run it reuses that run's result and says so; after any change it trains a new run.
"""

from __future__ import annotations

from components.config import PipelineConfig
from pipeline.runtime.common import run_stage
from pipeline.runtime.search_space import apply_best
from pipeline.runtime.training_run import run_training


def main(cfg: PipelineConfig) -> None:
    if cfg.tune.apply_to_train:
        cfg = apply_best(cfg)
        print(
            f"training the tuned settings: method {cfg.model.method}, scales {cfg.model.train_scales}, "
            f"lr {cfg.train.lr:g}, crop {list(cfg.train.crop_size)}"
        )
    run_training(cfg)


if __name__ == "__main__":
    run_stage(main, __doc__)
