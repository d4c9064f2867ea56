"""The one TorchTrainer builder shared by the `train` and `tune` stages, and its worker loop.

Each worker: builds the model, restores the latest checkpoint when Ray hands one over (after a
worker failure, an elastic resize, or when the same run is started again after a driver crash),
trains with DDP on its shard, validates on its share of the val split, all-reduces the confusion
matrices, and reports. Rank 0 writes the checkpoint (a saved-model directory plus the training
state) and logs the epoch to MLflow; every worker reports, as Ray Train requires.

Workers read only what reaches every node: the pyramid at `pyramid_uri` (a published copy when
workers may be remote), storage and tracking through the variables of pipeline/runtime/environment.py.
The schedule counts samples, so an elastic run that lost a worker follows the same learning-rate
curve over samples seen as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from torch.utils.data import DataLoader, Subset

from components import methods
from components.config import ConfigError, PipelineConfig, validate_config
from components.data.dataset import PyramidEvalDataset, PyramidTrainDataset, loader_settings
from components.data.pyramid import PyramidReader
from components.models import build_model
from components.models.saved import WEIGHTS_FILE, write_model_files
from components.training import (
    autocast_dtype,
    bf16_blocker,
    build_optimizer,
    epoch_plan,
    evaluate,
    parameter_digest,
    prepare_device,
    train_one_epoch,
)
from pipeline.runtime.common import verbose
from pipeline.runtime.environment import Environment
from pipeline.runtime.errors import ClusterError, NotRetriedError
from pipeline.runtime.tracking import log_epoch

STATE_FILE = "train_state.pt"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this worker: allocated GPU memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def validation_scales(cfg: PipelineConfig) -> list[float]:
    """Scales used for the per-epoch validation: what the method trains on."""
    return methods.validation_scales(cfg.model.method, cfg.model.train_scales)


def _restore(model, optimizer) -> dict:
    """Load the latest checkpoint Ray hands over, if any; returns the training state."""
    from safetensors.torch import load_file

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"epoch": 0, "history": [], "resumed_at_epochs": [], "samples": 0}
    with checkpoint.as_directory() as directory:
        model.load_state_dict(load_file(Path(directory) / WEIGHTS_FILE))
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state.pop("optimizer"))
    state["resumed_at_epochs"] = [*state["resumed_at_epochs"], state["epoch"]]
    return state


def _loaders(cfg: PipelineConfig, rank: int, world: int, pyramid_uri: str):
    reader = PyramidReader(pyramid_uri, Environment.from_environ().storage(pyramid_uri))
    train_set = PyramidTrainDataset(reader, "train", cfg.model.train_scales, cfg.train.crop_size, cfg.loader,
                                    seed=cfg.train.seed + rank)
    loader_args = loader_settings(cfg.loader, cfg.ray.cpus_per_worker, ray.train.torch.get_device().type)
    train_loader = DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                              **loader_args)
    # DistributedSampler shards the training set; it is not used for validation because it pads
    # shards with repeated images, which would count them twice in the confusion matrix.
    train_loader = ray.train.torch.prepare_data_loader(train_loader, move_to_device=False)
    val_set = PyramidEvalDataset(reader, "val", validation_scales(cfg))
    val_loader = DataLoader(Subset(val_set, range(rank, len(val_set), world)), batch_size=1, **loader_args)
    return train_set, train_loader, val_loader, reader.manifest["classes"]


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


def epoch_line(row: dict, epochs: int, seconds: float) -> str:
    """One line per epoch, from rank 0: what was reached, how fast, and about how long is left."""
    left = seconds * (epochs - row["epoch"])
    return (f"epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f}, val mIoU {row['val_miou']:.4f}, "
            f"{row['images_per_s']:.1f} images/s on {row['workers']} worker(s), {seconds:.0f} s; "
            f"about {int(left // 60)} min {int(left % 60)} s left\n")


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = validate_config(loop_config["params"], source="train_loop_config")
    if not loop_config.get("verbose"):
        _quiet_ray_train()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    prepare_device(device)
    torch.manual_seed(cfg.train.seed)
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    if rank == 0 and cfg.train.precision == "auto":
        why_not = f" ({bf16_blocker()})" if amp_dtype is None else ""
        # Written to the process's own stderr, not print(): Ray Train patches print() on workers to
        # log the line and, once a library has wrapped sys.stdout/stderr, to echo it as well (twice).
        sys.__stderr__.write(f"precision auto on {device.type}: "
                             f"{str(amp_dtype or 'fp32').removeprefix('torch.')}{why_not}\n")
    scaler = torch.amp.GradScaler("cuda") if amp_dtype is torch.float16 else None

    model = build_model(cfg.model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.train, device.type)
    state = _restore(model, optimizer)
    if rank == 0 and state["resumed_at_epochs"]:
        # What Ray Train's failure decision said at INFO: the workers restarted (after a failure,
        # or the stage ran again after it was stopped) and go on from the last checkpoint.
        sys.__stderr__.write(f"resumed from the checkpoint of epoch {state['epoch']} of {cfg.train.epochs}\n")
    if cfg.train.sync_batchnorm and world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = ray.train.torch.prepare_model(model)
    bare = model.module if hasattr(model, "module") else model

    train_set, train_loader, val_loader, classes = _loaders(cfg, rank, world, loop_config["pyramid_uri"])
    num_classes = len(classes["names"])
    epoch_samples, steps = epoch_plan(len(train_set), cfg.train, cfg.ray.worker_range[1], world)
    total_samples = epoch_samples * cfg.train.epochs
    for epoch in range(state["epoch"], cfg.train.epochs):
        started = time.monotonic()
        train_set.set_epoch(epoch)
        if hasattr(train_loader, "sampler") and hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(model, train_loader, optimizer, cfg.model, cfg.train, device, amp_dtype,
                                state["samples"], total_samples, cfg.train.batch_size * world, scaler,
                                cfg.train.channels_last, max_steps=steps)
        matrix = evaluate(model, val_loader, validation_scales(cfg), num_classes, device, amp_dtype,
                          cfg.train.channels_last).all_reduce()
        digests, nodes = [None] * world, [None] * world
        node = ray.get_runtime_context().get_node_id()
        if world > 1:
            torch.distributed.all_gather_object(digests, parameter_digest(bare))
            torch.distributed.all_gather_object(nodes, node)
        else:
            nodes = [node]
        row = {
            "epoch": epoch + 1,
            "loss": stats["loss"],
            "val_miou": matrix.miou(),
            "val_pixel_accuracy": matrix.pixel_accuracy(),
            "lr": stats["lr"],
            "images_per_s": stats["images"] * world / max(stats["seconds"], 1e-9),
            "epoch_seconds": stats["seconds"],
            "step_seconds": stats["seconds"] / max(stats["steps"], 1),
            "workers": world,
            "nodes": sorted(set(nodes)),  # the Ray nodes this epoch's workers ran on
            "samples_seen": stats["samples"],
            "lr_at_samples": stats["samples"] - cfg.train.batch_size * world,  # where `lr` was set
            "peak_memory_mb": peak_memory_mb(device),
            "replicas_in_sync": int(len(set(digests)) == 1),
        }
        state.update(epoch=epoch + 1, samples=stats["samples"], history=[*state["history"], row])
        report = {**row, "resumed_at_epochs": state["resumed_at_epochs"]}
        if rank != 0:
            ray.train.report(report, checkpoint=None)
            continue
        sys.__stderr__.write(epoch_line(row, cfg.train.epochs, time.monotonic() - started))
        if loop_config.get("mlflow_run_id"):
            log_epoch(loop_config["mlflow_uri"], loop_config["mlflow_run_id"], row, step=epoch + 1)
        with tempfile.TemporaryDirectory(prefix="hmsa-checkpoint-") as checkpoint_dir:
            # A checkpoint is a saved-model directory plus the training state.
            metadata = {"epoch": epoch + 1, **row, "classes": classes}
            write_model_files(bare, cfg.model, checkpoint_dir, metadata=metadata)
            torch.save({**state, "optimizer": optimizer.state_dict()}, Path(checkpoint_dir) / STATE_FILE)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))


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
