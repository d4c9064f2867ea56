"""Framework-free pieces of the training loop: optimiser, schedule, precision, one epoch, validation.

Ray Train wiring (workers, checkpoints, reports) lives in pipeline/; everything here runs the same
in a single process, under DDP, and in tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time

import torch
from torch import nn

from components.config import ModelConfig, TrainConfig
from components.losses import segmentation_loss
from components.metrics import ConfusionMatrix

# oneDNN instruction sets below AVX512_CORE_BF16: with ONEDNN_MAX_CPU_ISA (or its old name
# DNNL_MAX_CPU_ISA) capped at one of these, bf16 convolutions run on a reference path about 35x
# slower than fp32 (measured: 6.7 s against 0.47 s per default training step on AMD EPYC), whatever
# the CPU itself has.
ONEDNN_ISAS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2",
                                      "AVX512_CORE", "AVX512_CORE_VNNI"})


def bf16_blocker() -> str | None:
    """Why bf16 autocast would not run natively on this CPU, or None where it would: the CPU lacks
    AVX512-BF16 and AMX, or the process caps the instruction sets PyTorch's kernels may use
    (ATEN_CPU_CAPABILITY below AVX512, ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16). Caps are how an
    operator pins a fleet to its oldest machines, and how this project measures an AVX2-only CPU."""
    if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return "the CPU has neither AVX512-BF16 nor AMX"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        return f"PyTorch's kernels are limited to {capability} (ATEN_CPU_CAPABILITY)"
    for variable in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        isa = os.environ.get(variable, "").strip().upper()
        if isa in ONEDNN_ISAS_WITHOUT_BF16:
            return f"oneDNN is limited to {isa} ({variable})"
    return None


def cpu_supports_bf16() -> bool:
    """True where bf16 autocast runs natively on this CPU (see bf16_blocker), so it pays off."""
    return bf16_blocker() is None


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a `train.precision` value on `device`; None means full fp32."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type == "cpu" and dtype is torch.float16:
        raise ValueError("train.precision = fp16 is for GPUs; use bf16 or fp32 on CPU")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def prepare_device(device: torch.device) -> None:
    """Library settings for training on `device`. On CUDA, cuDNN autotunes every convolution for
    the fixed crop and batch shapes: a few slower steps first, the fastest kernels after."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def compiles(setting: str | bool, device: torch.device) -> bool:
    """Whether a `train.compile` value compiles the model on `device` (auto: on CUDA only)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str = "cpu") -> torch.optim.SGD:
    """SGD with momentum; no weight decay on norm layers and biases (standard for segmentation).
    On CUDA the fused step: one kernel for all parameters instead of several per tensor."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=device_type == "cuda" or None)


def poly_lr(base_lr: float, done: float, total: float, power: float) -> float:
    """The poly schedule of DeepLab: base_lr * (1 - done / total) ** power. `done` and `total` count
    training samples, so the curve does not depend on how many workers shared the work."""
    return base_lr * max(0.0, 1 - done / max(total, 1)) ** power


def epoch_plan(train_len: int, cfg: TrainConfig, max_workers: int, world: int) -> tuple[int, int]:
    """(samples of one epoch, steps of one worker in it) for `world` workers.

    An epoch is a number of samples, not of steps: the whole training split, or with
    `train.steps_per_epoch` at most that many steps of the full worker count. Fewer workers (an
    elastic run after a node left) each take more steps to cover the same samples."""
    samples = train_len
    if cfg.steps_per_epoch is not None:
        samples = min(samples, cfg.steps_per_epoch * cfg.batch_size * max_workers)
    steps = max(1, samples // (cfg.batch_size * world))
    return samples, steps


# The columns of the training curves (train.curves), one row per epoch of the history.
CURVE_COLUMNS = ["epoch", "loss", "val_miou", "lr", "lr_at_samples", "samples_seen", "workers", "images_per_s",
                 "epoch_seconds", "step_seconds"]


def summarize_history(history: list[dict]) -> dict:
    """A training's figures from its per-epoch history (the rows train_one_epoch's caller records):
    the last epoch's loss and val mIoU, mean speeds, peak memory, and where each epoch trained."""
    return {
        "final_val_miou": history[-1]["val_miou"],
        "final_loss": history[-1]["loss"],
        "epochs": len(history),
        "images_per_s": sum(r["images_per_s"] for r in history) / len(history),
        "epoch_seconds": sum(r["epoch_seconds"] for r in history) / len(history),
        "step_seconds": sum(r["step_seconds"] for r in history) / len(history),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in history),
        "replicas_in_sync": all(r["replicas_in_sync"] for r in history),
        "workers_per_epoch": [r["workers"] for r in history],
        "worker_nodes": sorted({n for r in history for n in r["nodes"]}),
    }


def _to_device(batch: dict, device: torch.device, channels_last: bool) -> tuple[dict, torch.Tensor]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = {s: t.to(device, non_blocking=True).contiguous(memory_format=fmt) for s, t in batch["images"].items()}
    return images, batch["label"].to(device, non_blocking=True)


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, model_cfg: ModelConfig,
                    train_cfg: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None,
                    first_sample: int, total_samples: int, samples_per_step: int,
                    scaler: torch.amp.GradScaler | None = None, channels_last: bool = True,
                    max_steps: int | None = None) -> dict:
    """One pass over `loader` (at most `max_steps`); the learning rate follows the global count of
    samples seen (`samples_per_step` = batch size x workers). Returns mean loss, images this
    process saw, seconds, steps, the last learning rate, the global sample count at the end, and the
    first step's seconds (where a compiled model compiles)."""
    model.train()
    # The loss is summed on the device and read once per epoch: a .item() per step would make the
    # host wait for the device at every step.
    total_loss, images, steps, lr = torch.zeros((), device=device), 0, 0, train_cfg.lr
    samples, first_step_seconds = first_sample, 0.0
    start = time.perf_counter()
    for batch in loader:
        if max_steps is not None and steps >= max_steps:
            break
        lr = poly_lr(train_cfg.lr, samples, total_samples, train_cfg.poly_power)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, target = _to_device(batch, device, channels_last)
        with autocast(device, amp_dtype):
            output = model(inputs)
        loss = segmentation_loss(output, target, model_cfg, train_cfg.loss)  # in fp32: the losses upcast
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total_loss += loss.detach() * target.shape[0]
        images += target.shape[0]
        steps += 1
        samples += samples_per_step
        if steps == 1:  # host time: compiling happens on the host, before the step's kernels run
            first_step_seconds = time.perf_counter() - start
    mean_loss = total_loss.item() / max(images, 1)  # waits for the device once
    seconds = time.perf_counter() - start
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"training loss became {mean_loss} in the epoch ending at {samples} samples; "
                                 "lower train.lr")
    return {"loss": mean_loss, "images": images, "seconds": seconds, "lr": lr, "steps": steps, "samples": samples,
            "first_step_seconds": first_step_seconds}


@torch.no_grad()
def evaluate(model: nn.Module, loader, scales: list[float], num_classes: int, device: torch.device,
             amp_dtype: torch.dtype | None = None, channels_last: bool = True, flip: bool = False) -> ConfusionMatrix:
    """Confusion matrix of the fused prediction at `scales` over `loader` (this process's share only)."""
    model.eval()
    matrix = ConfusionMatrix(num_classes)
    for batch in loader:
        inputs, target = _to_device(batch, device, channels_last)
        with autocast(device, amp_dtype):
            logits = model(inputs, scales).fused.float()
            if flip:
                flipped = {s: torch.flip(x, dims=[-1]) for s, x in inputs.items()}
                logits = logits + torch.flip(model(flipped, scales).fused.float(), dims=[-1])
        matrix.update(logits.argmax(1), target)
    return matrix


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes: equal across DDP ranks exactly when the replicas agree."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for param in model.parameters():
            digest.update(param.detach().float().cpu().numpy().tobytes())  # C order, whatever the strides
    return digest.hexdigest()
