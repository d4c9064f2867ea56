"""Training speed and model-FLOPs utilisation on a GPU; needs only torch, pydantic and `components`.

    python -m benchmarks.gpu [--steps 10] [--output results/bench/gpu.json]

For the default model (params.yaml's) and the paper's (ResNet-50, output stride 8, DeepLabV3+,
1024x1024 crops), single scale and hierarchical (0.5, 1.0): images/s and MFU (achieved training
FLOP/s over the GPU's dense bf16 peak, and over the bf16 matmul FLOP/s measured in the same run),
in bf16 autocast with channels_last, with and without torch.compile (its compile time reported).
FLOPs are counted by components.flops on the meta device.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.machine import describe
from benchmarks.steps import matmul_flops_per_second, median, time_training_steps
from components.config import ModelConfig
from components.flops import train_step_flops

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets.
BF16_PEAK = {"H200": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
             "L40S": 362e12, "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12}

MODELS = {
    "default": (dict(trunk="resnet18", output_stride=16, decoder="deeplabv3plus", decoder_channels=64,
                     attention_channels=64, num_classes=19), (192, 192), 16),
    "paper": (dict(trunk="resnet50", output_stride=8, decoder="deeplabv3plus", decoder_channels=256,
                   attention_channels=256, num_classes=19), (1024, 1024), 2),
}
METHODS = {"single": [1.0], "hierarchical": [0.5, 1.0]}


def bf16_peak(name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


def compiled_step_time(cfg: ModelConfig, size, batch: int, steps: int) -> tuple[float, float]:
    """(median step seconds, compile seconds) under torch.compile: the first step compiles."""
    timings = time_training_steps(cfg, size, batch, steps + 2, warmup=0, dtype=torch.bfloat16, device="cuda",
                                  wrap=torch.compile)
    step = median(timings[2:])
    return step, timings[0] - step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--output", default="results/bench/gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: this benchmark needs one")
    torch.backends.cudnn.benchmark = True
    machine = describe()
    peak = bf16_peak(machine["gpu"])
    matmul = matmul_flops_per_second(torch.bfloat16, n=8192, device="cuda")
    print(f"{machine['gpu']}: bf16 matmul {matmul / 1e12:.0f} TFLOP/s measured, "
          f"{'%.0f' % (peak / 1e12) if peak else 'unknown'} TFLOP/s data-sheet peak")
    rows = []
    for model_name, (settings, size, batch) in MODELS.items():
        for method, scales in METHODS.items():
            cfg = ModelConfig(method=method, train_scales=scales, **settings)
            flops = train_step_flops(cfg, size, batch)
            variants = [("bf16 channels_last", False)] + ([] if args.no_compile else [("bf16 channels_last compiled", True)])
            for variant, compiled in variants:
                torch.cuda.reset_peak_memory_stats()
                if compiled:
                    step, compile_seconds = compiled_step_time(cfg, size, batch, args.steps)
                else:
                    step = median(time_training_steps(cfg, size, batch, args.steps, dtype=torch.bfloat16,
                                                      device="cuda"))
                    compile_seconds = None
                row = {"model": model_name, "method": method, "variant": variant, "crop": list(size), "batch": batch,
                       "images_per_s": batch / step, "step_s": step, "train_tflops_per_step": flops / 1e12,
                       "achieved_tflops_per_s": flops / step / 1e12,
                       "mfu_of_datasheet_peak": flops / step / peak if peak else None,
                       "fraction_of_measured_matmul": flops / step / matmul,
                       "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
                       "compile_s": compile_seconds}
                rows.append(row)
                mfu = f"{row['mfu_of_datasheet_peak']:.2f}" if peak else "n/a"
                print(f"{model_name:8s} {method:13s} {variant:28s} {row['images_per_s']:8.1f} img/s  "
                      f"{row['achieved_tflops_per_s']:7.1f} TFLOP/s  MFU {mfu}  "
                      f"({row['fraction_of_measured_matmul']:.2f} of matmul)  {row['peak_memory_gb']:.1f} GB"
                      + (f"  compile {compile_seconds:.0f} s" if compile_seconds else ""))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "matmul_bf16_tflops": matmul / 1e12,
                               "datasheet_bf16_tflops": peak / 1e12 if peak else None, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
