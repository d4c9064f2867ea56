"""Where a training step spends its time: torch.profiler over a few steps.

    .venv/bin/python -m benchmarks.profile_step [--params params.yaml] [--steps 3]
    python -m benchmarks.profile_step --device cuda --model paper --method hierarchical --batch 8

By default the model, crop, batch and precision of params.yaml on the CPU. `--model paper` takes
benchmarks.gpu's paper model (ResNet-50 OS8, 1024x1024, bf16) instead and needs no params file, so
it runs where benchmarks.gpu runs. Prints the operators with the most self time (the device's time
on a GPU) and writes a Chrome trace to results/bench/profile_trace.json (chrome://tracing, Perfetto).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.gpu import METHODS, MODELS
from benchmarks.steps import training_step
from components.config import ModelConfig


def profile_training_steps(cfg: ModelConfig, size: tuple[int, int], batch: int, steps: int,
                           dtype: torch.dtype | None, device: str = "cpu") -> profile:
    """torch.profiler over `steps` training steps (benchmarks.steps.training_step) after two
    untimed ones (cuDNN picks its kernels in the first)."""
    step = training_step(cfg, size, batch, dtype, device=device)
    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    return prof


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", choices=["params", "paper"], default="params")
    parser.add_argument("--method", choices=sorted(METHODS),
                        help="override the model's method (training scales as in benchmarks.gpu)")
    parser.add_argument("--batch", type=int, help="override the batch")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output", default="results/bench/profile_trace.json")
    args = parser.parse_args()
    if args.model == "paper":
        settings, size, batches = MODELS["paper"]
        method = args.method or "hierarchical"
        cfg = ModelConfig(method=method, train_scales=METHODS[method], **settings)
        batch, dtype = batches[0], torch.bfloat16
    else:
        from components.config import load_config
        from components.training import autocast_dtype

        params = load_config(args.params)
        cfg = params.model.model_copy(update={"pretrained": None})
        if args.method:
            cfg = cfg.model_copy(update={"method": args.method, "train_scales": METHODS[args.method]})
        size, batch = tuple(params.train.crop_size), params.train.batch_size
        dtype = autocast_dtype(params.train.precision, torch.device(args.device))
    batch = args.batch or batch
    prof = profile_training_steps(cfg, size, batch, args.steps, dtype, args.device)
    print(f"{cfg.method} {cfg.trunk} OS{cfg.output_stride}, batch {batch}, crop {size}, "
          f"precision {dtype or 'fp32'}, {args.steps} steps on {args.device}:")
    sort_by = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=70))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(args.output)
    print(f"trace: {args.output}")


if __name__ == "__main__":
    main()
