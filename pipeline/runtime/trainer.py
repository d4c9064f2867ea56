"""The one TorchTrainer builder shared by the `train` and `tune` stages, and the Ray side of its
workers: each runs pipeline/runtime/worker_loop.py through a Ray Train session.

Workers read only what reaches every node: the pyramid at `pyramid_uri` (a published copy when
workers may be remote), storage and tracking through the variables of pipeline/runtime/environment.py.
The schedule counts samples, so an elastic run that lost a worker follows the same learning-rate
curve over samples seen as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

from components.config import ConfigError, PipelineConfig, validate_config
from pipeline.runtime.common import verbose
from pipeline.runtime.errors import ClusterError, NotRetriedError
from pipeline.runtime.worker_loop import train_worker


class RayTrainSession:
    """A Ray Train worker's session (pipeline.runtime.worker_loop.WorkerSession)."""

    def __init__(self) -> None:
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model)

    def prepare_train_loader(self, loader):
        return ray.train.torch.prepare_data_loader(loader, move_to_device=False)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        checkpoint = None if checkpoint_dir is None else ray.train.Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(metrics, checkpoint=checkpoint)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def _quiet_ray_train() -> None:
    """Ray Train logs every report (a 700-character line) and checkpoint at INFO; the epoch line
    says what a person needs, and a stage's `--verbose` brings them back. The report line's logger
    is named after its module's file, not its module. boto's INFO line on where it found credentials
    (once per worker reading S3) goes the same way."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
    with contextlib.suppress(ImportError):
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = validate_config(loop_config["params"], source="train_loop_config")
    if not loop_config.get("verbose"):
        _quiet_ray_train()
    train_worker(cfg, RayTrainSession(), loop_config["pyramid_uri"], loop_config.get("mlflow_uri"),
                 loop_config.get("mlflow_run_id"))


# Worker errors that a retry meets again: from the same checkpoint, data and settings the loss becomes
# NaN again and a bad setting stays bad. Ray Train retries every worker error ray.max_failures times
# (minutes each, then a traceback); these end the run at once, in one line.
DETERMINISTIC_ERRORS = (FloatingPointError, ConfigError)


class EndOnDeterministicErrors(ray.train.UserCallback):
    """Runs in Ray Train's controller after a worker raised: an error it raises here ends the run
    instead of letting the failure policy retry it."""

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            if isinstance(error, DETERMINISTIC_ERRORS):
                raise NotRetriedError(f"training worker {rank}: {error} (not retried: a retry from the last "
                                      "checkpoint would meet it again)")


def not_retried(err: BaseException) -> NotRetriedError | None:
    """The deterministic worker error behind a failed fit(), if that is what ended it."""
    cause = getattr(err, "controller_failure", None)
    return cause if isinstance(cause, NotRetriedError) else None


def start_failure(err: BaseException, rc) -> ClusterError | None:
    """One line for a fit() that ended because its workers could not start ray.max_start_failures + 1
    times (Ray Train would retry that for ever: a search never finished nor failed)."""
    # Ray Train's own error types for it; not public, hence the import here
    from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError

    cause = getattr(err, "controller_failure", None)
    if not isinstance(cause, (WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError)):
        return None
    return ClusterError(f"the training's workers could not start {rc.max_start_failures + 1} times (last: "
                        f"{str(cause).splitlines()[0]}); the cluster's resources are held by other work (`ray "
                        "status` shows by what): free them, or raise ray.max_start_failures to wait longer")


def build_trainer(cfg: PipelineConfig, launch, run_name: str, mlflow_run_id: str | None = None,
                  callbacks: list | None = None) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer for this config on the cluster that `launch` (pipeline.runtime.launch.Launch) chose.
    The config travels to the workers as a plain dict; epochs are logged to `mlflow_run_id`."""
    rc = cfg.ray
    resources = {"CPU": rc.cpus_per_worker, **({"GPU": rc.gpus_per_worker} if launch.use_gpu else {})}
    low, high = rc.worker_range
    storage_path, storage_filesystem = launch.run_storage()
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"params": cfg.model_dump(mode="json"), "mlflow_run_id": mlflow_run_id,
                           "verbose": verbose(), **launch.loop_settings()},
        scaling_config=ray.train.ScalingConfig(num_workers=low if low == high else (low, high),
                                               use_gpu=launch.use_gpu, resources_per_worker=resources,
                                               placement_strategy=rc.placement_strategy,
                                               elastic_resize_monitor_interval_s=rc.elastic_resize_interval_s),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=rc.max_failures,
                                                   controller_failure_limit=rc.max_start_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=rc.checkpoints_to_keep,
                                                         checkpoint_score_attribute="val_miou",
                                                         checkpoint_score_order="max"),
            callbacks=[EndOnDeterministicErrors(), *(callbacks or [])],
            # Ray Train's INFO lines (worker group requests and starts, process group set-up, each
            # failure decision with its traceback: 40 lines when Tune stops a trial) with --verbose
            # only; its warnings and errors always. Its own log files keep every level.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
    )
