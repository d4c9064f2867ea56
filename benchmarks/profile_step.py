"""Where a training step of the default model spends its time: torch.profiler over a few steps.

    .venv/bin/python -m benchmarks.profile_step [--params params.yaml] [--steps 3]

Prints the operators with the most self time and writes a Chrome trace to
results/bench/profile_trace.json (open it in chrome://tracing or Perfetto).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from components.config import load_config
from components.losses import segmentation_loss
from components.models import build_model
from components.training import autocast_dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output", default="results/bench/profile_trace.json")
    args = parser.parse_args()
    cfg = load_config(args.params)
    model_cfg = cfg.model.model_copy(update={"pretrained": None})
    model = build_model(model_cfg).train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch, size = cfg.train.batch_size, tuple(cfg.train.crop_size)
    image = torch.randn(batch, 3, *size).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, model_cfg.num_classes, (batch, *size))
    dtype = autocast_dtype(cfg.train.precision, torch.device("cpu"))

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            output = model(image)
        loss = segmentation_loss(output, target, model_cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(args.steps):
            step()
    print(f"{model_cfg.method} {model_cfg.trunk} OS{model_cfg.output_stride}, batch {batch}, crop {size}, "
          f"precision {dtype or 'fp32'}:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(args.output)
    print(f"trace: {args.output}")


if __name__ == "__main__":
    main()
