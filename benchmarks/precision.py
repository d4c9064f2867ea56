"""Training-step throughput of fp32 vs bf16 autocast, contiguous vs channels_last, in one run.

    .venv/bin/python -m benchmarks.precision [--trunk resnet18] [--output-stride 16] [--size 192]

Hierarchical model on (0.5, 1.0), batch 4, two threads; prints images/s and the ratio to fp32.
"""

from __future__ import annotations

import argparse
import time

import torch

from components.config import ModelConfig
from components.losses import segmentation_loss
from components.models import build_model
from components.training import autocast, cpu_supports_bf16


def images_per_second(cfg: ModelConfig, bf16: bool, channels_last: bool, size: int, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = build_model(cfg).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    image = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    target = torch.randint(0, cfg.num_classes, (batch, size, size))
    timings = []
    for _ in range(steps + 2):  # the first two steps warm up the allocator and kernels
        start = time.perf_counter()
        with autocast(torch.device("cpu"), torch.bfloat16 if bf16 else None):
            output = model(image)
        loss = segmentation_loss(output, target, cfg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        timings.append(time.perf_counter() - start)
    return batch * steps / sum(timings[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trunk", default="resnet18")
    parser.add_argument("--output-stride", type=int, default=16)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = ModelConfig(trunk=args.trunk, output_stride=args.output_stride, decoder_channels=64,
                      attention_channels=64, train_scales=[0.5, 1.0])
    print(f"CPU has native bf16: {cpu_supports_bf16()}; {args.trunk} OS{args.output_stride}, {args.size}px crops")
    base = None
    for bf16 in (False, True):
        for channels_last in (False, True):
            rate = images_per_second(cfg, bf16, channels_last, args.size, 4, args.steps)
            base = base or rate
            print(f"{'bf16' if bf16 else 'fp32'} {'channels_last' if channels_last else 'contiguous':13s} "
                  f"{rate:6.1f} images/s  {rate / base:.2f}x")


if __name__ == "__main__":
    main()
