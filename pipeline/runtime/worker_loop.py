"""What every training worker runs, whoever started it: Ray Train (pipeline/runtime/trainer.py) or
a plain torch.distributed process (benchmarks/gpu_check.py, for a GPU machine without Ray).

Each worker builds the model, restores the latest checkpoint its session hands over (after a worker
failure, an elastic resize, or when the same run is started again after a driver crash), trains
with DDP on its shard, validates on its share of the val split, all-reduces the confusion
matrices, and reports. Rank 0 writes the checkpoint (a saved-model directory plus the training
state) and logs the epoch to MLflow; every worker reports.

This module imports no Ray: what differs between the two ways of running is the session.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import DataLoader, Subset

from components import methods
from components.config import PipelineConfig
from components.data.dataset import PyramidEvalDataset, PyramidTrainDataset, loader_settings
from components.data.pyramid import PyramidReader
from components.models import build_model
from components.models.saved import WEIGHTS_FILE, write_model_files
from components.training import (
    autocast_dtype,
    bf16_blocker,
    build_optimizer,
    compiles,
    epoch_plan,
    evaluate,
    parameter_digest,
    prepare_device,
    train_one_epoch,
)
from pipeline.runtime.environment import Environment

STATE_FILE = "train_state.pt"


class WorkerSession(Protocol):
    """The worker's view of the run that started it."""

    rank: int
    world: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on the device, wrapped for data parallelism when there are several workers."""

    def prepare_train_loader(self, loader: DataLoader) -> DataLoader:
        """The training loader, sharded across the workers."""

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """The directory of the run's latest checkpoint while the block runs, or None."""

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        """One epoch's metrics, with rank 0's checkpoint directory (copied before this returns)."""

    def node(self) -> str:
        """The machine this worker runs on, as the run names it."""


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this worker: allocated GPU memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def validation_scales(cfg: PipelineConfig) -> list[float]:
    """Scales used for the per-epoch validation: what the method trains on."""
    return methods.validation_scales(cfg.model.method, cfg.model.train_scales)


def epoch_line(row: dict, epochs: int, seconds: float, compiled_now: bool = False) -> str:
    """One line per epoch, from rank 0: what was reached, how fast, and about how long is left
    (`compiled_now`: this epoch compiled the model, and says what that took)."""
    left = seconds * (epochs - row["epoch"])
    compiling = f" (first step {row['first_step_seconds']:.0f} s: compiling)" if compiled_now else ""
    return (f"epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f}, val mIoU {row['val_miou']:.4f}, "
            f"{row['images_per_s']:.1f} images/s on {row['workers']} worker(s), {seconds:.0f} s{compiling}; "
            f"about {int(left // 60)} min {int(left % 60)} s left\n")


def say(line: str) -> None:
    """A line of rank 0's to the process's own stderr, not print(): Ray Train patches print() on
    workers to log the line and, once a library has wrapped sys.stdout/stderr, to echo it as well."""
    sys.__stderr__.write(line)


def restore(model, optimizer, session: WorkerSession) -> dict:
    """Load the latest checkpoint the session hands over, if any; returns the training state."""
    from safetensors.torch import load_file

    with session.latest_checkpoint() as directory:
        if directory is None:
            return {"epoch": 0, "history": [], "resumed_at_epochs": [], "samples": 0}
        model.load_state_dict(load_file(Path(directory) / WEIGHTS_FILE))
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state.pop("optimizer"))
    state["resumed_at_epochs"] = [*state["resumed_at_epochs"], state["epoch"]]
    return state


def loaders(cfg: PipelineConfig, session: WorkerSession, pyramid_uri: str):
    reader = PyramidReader(pyramid_uri, Environment.from_environ().storage(pyramid_uri))
    train_set = PyramidTrainDataset(reader, "train", cfg.model.train_scales, cfg.train.crop_size, cfg.loader,
                                    seed=cfg.train.seed + session.rank)
    loader_args = loader_settings(cfg.loader, cfg.ray.cpus_per_worker, session.device.type)
    train_loader = DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                              **loader_args)
    # A DistributedSampler shards the training set; it is not used for validation because it pads
    # shards with repeated images, which would count them twice in the confusion matrix.
    train_loader = session.prepare_train_loader(train_loader)
    val_set = PyramidEvalDataset(reader, "val", validation_scales(cfg))
    val_loader = DataLoader(Subset(val_set, range(session.rank, len(val_set), session.world)), batch_size=1,
                            **loader_args)
    return train_set, train_loader, val_loader, reader.manifest["classes"]


def train_worker(cfg: PipelineConfig, session: WorkerSession, pyramid_uri: str, mlflow_uri: str | None = None,
                 mlflow_run_id: str | None = None) -> None:
    rank, world, device = session.rank, session.world, session.device
    prepare_device(device)
    torch.manual_seed(cfg.train.seed)
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    if rank == 0 and cfg.train.precision == "auto":
        why_not = f" ({bf16_blocker()})" if amp_dtype is None else ""
        say(f"precision auto on {device.type}: {str(amp_dtype or 'fp32').removeprefix('torch.')}{why_not}\n")
    scaler = torch.amp.GradScaler("cuda") if amp_dtype is torch.float16 else None

    model = build_model(cfg.model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.train, device.type)
    state = restore(model, optimizer, session)
    if rank == 0 and state["resumed_at_epochs"]:
        # What Ray Train's failure decision says at INFO: the workers restarted (after a failure,
        # or the stage ran again after it was stopped) and go on from the last checkpoint.
        say(f"resumed from the checkpoint of epoch {state['epoch']} of {cfg.train.epochs}\n")
    if cfg.train.sync_batchnorm and world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    compiled = compiles(cfg.train.compile, device)
    if compiled:
        # In place (nn.Module.compile): the parameters' names, and so checkpoints and saved models,
        # stay those of the eager model. Compiled lazily, by the first training and validation steps.
        model.compile()
        if rank == 0:
            setting = {True: "on", False: "off"}.get(cfg.train.compile, cfg.train.compile)  # YAML's on is True
            say(f"torch.compile on {device.type} (train.compile: {setting}): the first steps compile\n")
    model = session.prepare_model(model)
    bare = model.module if hasattr(model, "module") else model

    train_set, train_loader, val_loader, classes = loaders(cfg, session, pyramid_uri)
    num_classes = len(classes["names"])
    epoch_samples, steps = epoch_plan(len(train_set), cfg.train, cfg.ray.worker_range[1], world)
    total_samples = epoch_samples * cfg.train.epochs
    first_epoch = state["epoch"]
    for epoch in range(first_epoch, cfg.train.epochs):
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
        if world > 1:
            torch.distributed.all_gather_object(digests, parameter_digest(bare))
            torch.distributed.all_gather_object(nodes, session.node())
        else:
            nodes = [session.node()]
        row = {
            "epoch": epoch + 1,
            "loss": stats["loss"],
            "val_miou": matrix.miou(),
            "val_pixel_accuracy": matrix.pixel_accuracy(),
            "lr": stats["lr"],
            "images_per_s": stats["images"] * world / max(stats["seconds"], 1e-9),
            "epoch_seconds": stats["seconds"],
            "step_seconds": stats["seconds"] / max(stats["steps"], 1),
            "first_step_seconds": stats["first_step_seconds"],
            "workers": world,
            "nodes": sorted(set(nodes)),  # the nodes this epoch's workers ran on
            "samples_seen": stats["samples"],
            "lr_at_samples": stats["samples"] - cfg.train.batch_size * world,  # where `lr` was set
            "peak_memory_mb": peak_memory_mb(device),
            "replicas_in_sync": int(len(set(digests)) == 1),
        }
        state.update(epoch=epoch + 1, samples=stats["samples"], history=[*state["history"], row])
        report = {**row, "resumed_at_epochs": state["resumed_at_epochs"]}
        if rank != 0:
            session.report(report, None)
            continue
        say(epoch_line(row, cfg.train.epochs, time.monotonic() - started, compiled and epoch == first_epoch))
        if mlflow_run_id:
            from pipeline.runtime.tracking import log_epoch

            log_epoch(mlflow_uri, mlflow_run_id, row, step=epoch + 1)
        with tempfile.TemporaryDirectory(prefix="hmsa-checkpoint-") as checkpoint_dir:
            # A checkpoint is a saved-model directory plus the training state.
            metadata = {"epoch": epoch + 1, **row, "classes": classes}
            write_model_files(bare, cfg.model, checkpoint_dir, metadata=metadata)
            torch.save({**state, "optimizer": optimizer.state_dict()}, Path(checkpoint_dir) / STATE_FILE)
            session.report(report, Path(checkpoint_dir))

