"""Training speed and model-FLOPs utilisation on a GPU; needs only torch, pydantic and `components`.

    python -m benchmarks.gpu [--steps 10] [--output results/bench/gpu.json]

For the default model (params.yaml's) and the paper's (ResNet-50, output stride 8, DeepLabV3+,
1024x1024 crops, batch 2 and 8), single scale and hierarchical (0.5, 1.0): images/s and MFU (achieved training
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
from benchmarks.steps import compile_static, matmul_flops_per_second, median, time_training_steps
from components.config import ModelConfig
from components.flops import train_step_flops

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets.
BF16_PEAK = {"H200": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
             "L40S": 362e12, "L4": 121e12, "A10": 125e12, "RTX 4090": 165e12}

# (model settings, crop, batches), the paper's model first (the GPU target is about it). The largest
# batch is also timed under torch.compile; the paper's model is timed at a larger batch than its 2
# per GPU too, because a batch of 2 leaves part of an H200 idle (MFU 0.21 at 2, 0.24 at 8, eager).
MODELS = {
    "paper": ({"trunk": "resnet50", "output_stride": 8, "decoder": "deeplabv3plus", "decoder_channels": 256,
                   "attention_channels": 256, "num_classes": 19}, (1024, 1024), (2, 8)),
    "default": ({"trunk": "resnet18", "output_stride": 16, "decoder": "deeplabv3plus", "decoder_channels": 64,
                     "attention_channels": 64, "num_classes": 19}, (192, 192), (16,)),
}
METHODS = {"single": [1.0], "hierarchical": [0.5, 1.0]}


def bf16_peak(name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


def compiled_step_time(cfg: ModelConfig, size, batch: int, steps: int, device: str) -> tuple[float, float]:
    """(median step seconds, compile seconds) under torch.compile: the first step compiles."""
    timings = time_training_steps(cfg, size, batch, steps + 2, warmup=0, dtype=torch.bfloat16, device=device,
                                  wrap=compile_static)
    step = median(timings[2:])
    return step, timings[0] - step


def planned_runs(compile_too: bool) -> list[tuple[str, str, int, bool]]:
    """(model, method, batch, compiled) in the order they run: every eager run first, so a run cut
    short by a time limit still has them; the compiled ones (each pays its compile time) last."""
    eager = [(model, method, batch, False)
             for model, (_, _, batches) in MODELS.items() for method in METHODS for batch in batches]
    compiled = [(model, method, batches[-1], True)
                for model, (_, _, batches) in MODELS.items() for method in METHODS] if compile_too else []
    return eager + compiled


def measure(model_name: str, method: str, batch: int, compiled: bool, steps: int, peak: float | None,
            matmul: float, device: str = "cuda") -> dict:
    """One row: images/s, achieved FLOP/s and its fraction of the peaks, peak memory."""
    settings, size, _ = MODELS[model_name]
    cfg = ModelConfig(method=method, train_scales=METHODS[method], **settings)
    flops = train_step_flops(cfg, size, batch)
    on_cuda = device == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    if compiled:
        step, compile_seconds = compiled_step_time(cfg, size, batch, steps, device)
    else:
        step = median(time_training_steps(cfg, size, batch, steps, dtype=torch.bfloat16, device=device))
        compile_seconds = None
    return {"model": model_name, "method": method,
            "variant": "bf16 channels_last" + (" compiled" if compiled else ""), "crop": list(size),
            "batch": batch, "images_per_s": batch / step, "step_s": step, "train_tflops_per_step": flops / 1e12,
            "achieved_tflops_per_s": flops / step / 1e12,
            "mfu_of_datasheet_peak": flops / step / peak if peak else None,
            "fraction_of_measured_matmul": flops / step / matmul,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None,
            "compile_s": compile_seconds}


def describe_row(row: dict) -> str:
    mfu = f"{row['mfu_of_datasheet_peak']:.2f}" if row["mfu_of_datasheet_peak"] is not None else "n/a"
    memory = f"  {row['peak_memory_gb']:.1f} GB" if row["peak_memory_gb"] is not None else ""
    compile_note = f"  compile {row['compile_s']:.0f} s" if row["compile_s"] is not None else ""
    return (f"{row['model']:8s} {row['method']:13s} batch {row['batch']:2d} {row['variant']:27s} "
            f"{row['images_per_s']:8.1f} img/s  {row['achieved_tflops_per_s']:7.1f} TFLOP/s  MFU {mfu}  "
            f"({row['fraction_of_measured_matmul']:.2f} of matmul){memory}{compile_note}")


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
          f"{'%.0f' % (peak / 1e12) if peak else 'unknown'} TFLOP/s data-sheet peak; torch {torch.__version__}, "
          f"cuDNN {torch.backends.cudnn.version()}", flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for model_name, method, batch, compiled in planned_runs(not args.no_compile):
        rows.append(measure(model_name, method, batch, compiled, args.steps, peak, matmul))
        print(describe_row(rows[-1]), flush=True)
        # Rewritten after every row (whole file, then renamed) so a run stopped by a time limit keeps
        # what it measured.
        partial = out.with_name(out.name + ".tmp")
        partial.write_text(json.dumps({"machine": machine, "matmul_bf16_tflops": matmul / 1e12,
                                       "datasheet_bf16_tflops": peak / 1e12 if peak else None, "rows": rows},
                                      indent=2))
        partial.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
