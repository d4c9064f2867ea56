"""The pipeline's own training worker on one device, without Ray: a check for a GPU machine that
has torch but no Ray. Needs torch, pydantic and the project only.

    python -m benchmarks.gpu_check [--model default|paper] [--method hierarchical] [--epochs 3]
                                   [--compile auto|on|off]

It builds a small pyramid of generated images, starts torch.distributed with world size 1 (NCCL on
CUDA, gloo on CPU), and runs pipeline/runtime/worker_loop.py, the code every Ray Train worker runs:
the loader, the training steps, the per-epoch validation with its all-reduced confusion matrix and
the checkpoint. Then it times benchmarks.steps' training step of the same model, crop and batch on
random tensors in the same process, compiled where the worker's model was (train.compile): the
ratio of the two steps is what the loader and the worker loop add. Writes
results/bench/gpu_check.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from benchmarks.gpu import METHODS, MODELS
from benchmarks.machine import describe
from benchmarks.steps import compile_static, median, time_training_steps
from components.atomic import atomic_file
from components.config import validate_config
from components.data.prepare import prepare_dataset
from components.data.pyramid import build_pyramid
from components.data.readers import read_cityscapes
from components.data.synthetic import write_cityscapes_layout
from components.storage import Storage
from components.training import autocast_dtype, compiles
from pipeline.runtime import output_files
from pipeline.runtime.ports import free_local_port
from pipeline.runtime.worker_loop import train_worker

ROOT = Path(__file__).resolve().parent.parent


class SingleProcessSession:
    """A world of one (pipeline.runtime.worker_loop.WorkerSession): no checkpoint to resume, and
    reports kept in memory."""

    rank, world = 0, 1

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reports: list[dict] = []

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)  # as Ray Train's prepare_model: DDP only for several workers

    def prepare_train_loader(self, loader):
        return loader

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        yield None

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        self.reports.append({**metrics, "checkpoint_files": sorted(p.name for p in checkpoint_dir.iterdir())
                             if checkpoint_dir else []})

    def node(self) -> str:
        return socket.gethostname()


def small_pyramid(root: Path, images: int, height: int, width: int) -> Path:
    """`images` generated training images and a quarter as many for validation, as a pyramid."""
    write_cityscapes_layout(root / "cityscapes", {"train": images, "val": max(1, images // 4)}, height, width, seed=3)
    prepare_dataset(read_cityscapes(root / "cityscapes"), root / "prepared")
    build_pyramid(root / "prepared", [0.25, 0.5, 1.0, 2.0], 16, Storage(), str(root / "pyramid"))
    return root / "pyramid"


def check_config(model: str, method: str, epochs: int, batch: int | None, pyramid: Path,
                 compile_setting: str | bool = "auto") -> dict:
    """params.yaml with the benchmark's model, crop and batch (its largest unless `batch`), the
    small pyramid and `train.compile`."""
    settings, crop, batches = MODELS[model]
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"].update(settings, method=method, train_scales=METHODS[method])
    raw["train"].update(epochs=epochs, batch_size=batch or batches[-1], crop_size=list(crop), compile=compile_setting)
    raw["pyramid"]["output"] = str(pyramid)
    raw["ray"]["cpus_per_worker"] = max(1, (os.cpu_count() or 2) - 1)
    return raw


def run_check(model: str, method: str, epochs: int, images: int, image_size: tuple[int, int], steps: int,
              workdir: Path, batch: int | None = None, compile_setting: str | bool = "auto") -> dict:
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    pyramid = small_pyramid(workdir / "data", images, *image_size)
    cfg = validate_config(check_config(model, method, epochs, batch, pyramid, compile_setting),
                          source="benchmarks.gpu_check")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_local_port()))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        session = SingleProcessSession(device)
        train_worker(cfg, session, str(pyramid))
    finally:
        dist.destroy_process_group()
    last = session.reports[-1]
    dtype = autocast_dtype(cfg.train.precision, device)
    compiled = compiles(cfg.train.compile, device)
    bare_step = median(time_training_steps(cfg.model, tuple(cfg.train.crop_size), cfg.train.batch_size, steps,
                                           dtype=dtype, channels_last=cfg.train.channels_last, device=device.type,
                                           wrap=compile_static if compiled else None))
    return {"machine": describe(), "device": str(device), "model": model, "method": method,
            "crop": cfg.train.crop_size, "batch": cfg.train.batch_size,
            "precision": str(dtype or "fp32").removeprefix("torch."), "compiled": compiled,
            "first_step_s": session.reports[0]["first_step_seconds"],
            "epochs": [{k: r[k] for k in ("epoch", "loss", "val_miou", "images_per_s", "step_seconds")}
                       for r in session.reports],
            "checkpoint_files": last["checkpoint_files"],
            "worker_step_s": last["step_seconds"], "benchmark_step_s": bare_step,
            "worker_over_benchmark": last["step_seconds"] / bare_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="default")
    parser.add_argument("--method", choices=sorted(METHODS), default="hierarchical")
    parser.add_argument("--epochs", type=int, default=3, help="the last epoch's steps are the ones compared")
    parser.add_argument("--images", type=int, default=64, help="generated training images")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("HEIGHT", "WIDTH"),
                        help="default: twice the crop's height, four times its width")
    parser.add_argument("--batch", type=int, default=None, help="default: the benchmark's largest for the model")
    parser.add_argument("--steps", type=int, default=10, help="benchmark steps timed")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="train.compile (auto: on CUDA); the benchmark step is compiled to match")
    parser.add_argument("--output", default="results/bench/gpu_check.json")
    args = parser.parse_args()
    crop = MODELS[args.model][1]
    size = tuple(args.image_size) if args.image_size else (2 * crop[0], 4 * crop[1])
    with tempfile.TemporaryDirectory(prefix="hmsa-gpu-check-") as tmp:
        result = run_check(args.model, args.method, args.epochs, args.images, size, args.steps, Path(tmp), args.batch,
                           {"on": True, "off": False}.get(args.compile, "auto"))
    for epoch in result["epochs"]:
        print(f"epoch {epoch['epoch']}: loss {epoch['loss']:.4f}, val mIoU {epoch['val_miou']:.4f}, "
              f"{epoch['images_per_s']:.1f} images/s, {epoch['step_seconds']:.3f} s per step")
    compiled = f", compiled, first step {result['first_step_s']:.0f} s" if result["compiled"] else ""
    print(f"{result['model']} {result['method']} batch {result['batch']} crop {result['crop']} on {result['device']} "
          f"({result['precision']}{compiled}): worker loop {result['worker_step_s']:.3f} s per step, benchmark step "
          f"{result['benchmark_step_s']:.3f} s: {result['worker_over_benchmark']:.2f}x")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out, output_files.BENCHMARK_RESULT) as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
