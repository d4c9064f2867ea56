"""Training speed and model-FLOPs utilisation on a GPU; needs only torch, pydantic and `components`.

    python -m benchmarks.gpu [--steps 10] [--output results/bench/gpu.json]

For the default model (params.yaml's) and the paper's (ResNet-50, output stride 8, DeepLabV3+,
1024x1024 crops, batch 2 and 8), single scale and hierarchical (0.5, 1.0): images/s and MFU (achieved training
FLOP/s over the GPU's dense bf16 peak, and over the bf16 matmul FLOP/s measured in the same run),
in bf16 autocast with channels_last, with and without torch.compile (its compile time reported).
Where torchvision is installed, the same for the anchor: torchvision's deeplabv3_resnet50 (output
stride 8, ASPP), what a user would train instead, at the paper model's crop and largest batch; then
the ratios the GPU targets are about (ours over the anchor, hierarchical over single scale).
FLOPs are counted by torch.utils.flop_counter on the meta device.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.machine import describe
from benchmarks.steps import (
    compile_static,
    compiled_step_seconds,
    matmul_flops_per_second,
    median,
    module_training_step,
    time_step,
    training_step,
)
from components.config import ModelConfig
from components.flops import count_flops, train_step_flops

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
ANCHOR = "anchor"  # torchvision's deeplabv3_resnet50, single scale, at the paper model's crop and largest batch


def anchor_model() -> torch.nn.Module:
    """torchvision's DeepLabV3 with a ResNet-50 (output stride 8, ASPP), untrained, 19 classes."""
    from torchvision.models.segmentation import deeplabv3_resnet50

    return deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=19, aux_loss=False)


def anchor_loss(output: dict, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(output["out"].float(), target)


def torchvision_installed() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def bf16_peak(name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


def module_train_flops(build: Callable[[], torch.nn.Module], loss_of: Callable, size, batch: int) -> int:
    """FLOPs of forward, loss and backward of the model `build` makes, counted on the meta device."""
    return count_flops(build, lambda model, image, target: loss_of(model.train()(image), target).backward(),
                       size, batch)


def planned_runs(compile_too: bool, anchor: bool = False) -> list[tuple[str, str, int, bool]]:
    """(model, method, batch, compiled) in the order they run: every eager run first, so a run cut
    short by a time limit still has them; the compiled ones (each pays its compile time) last. With
    `anchor`, torchvision's model right after the paper's, eager and compiled."""
    models = [(name, METHODS, batches) for name, (_, _, batches) in MODELS.items()]
    if anchor:
        models.insert(1, (ANCHOR, {"single": [1.0]}, MODELS["paper"][2][-1:]))
    eager = [(model, method, batch, False) for model, methods, batches in models for method in methods
             for batch in batches]
    compiled = [(model, method, batches[-1], True)
                for model, methods, batches in models for method in methods] if compile_too else []
    return eager + compiled


def step_and_flops(model_name: str, method: str, batch: int, device: str, wrap) -> tuple[Callable[[], None], int,
                                                                                       tuple[int, int]]:
    """The training step of one row (bf16 autocast, channels_last), its FLOPs and its crop."""
    if model_name == ANCHOR:
        size = MODELS["paper"][1]
        torch.manual_seed(0)
        step = module_training_step(anchor_model(), anchor_loss, 19, size, batch, torch.bfloat16, device=device,
                                    wrap=wrap)
        return step, module_train_flops(anchor_model, anchor_loss, size, batch), size
    settings, size, _ = MODELS[model_name]
    cfg = ModelConfig(method=method, train_scales=METHODS[method], **settings)
    return (training_step(cfg, size, batch, torch.bfloat16, device=device, wrap=wrap),
            train_step_flops(cfg, size, batch), size)


def measure(model_name: str, method: str, batch: int, compiled: bool, steps: int, peak: float | None,
            matmul: float, device: str = "cuda") -> dict:
    """One row: images/s, achieved FLOP/s and its fraction of the peaks, peak memory. A compiled
    row's first step compiles: its time over a later step's is the compile time."""
    on_cuda = device == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    step_fn, flops, size = step_and_flops(model_name, method, batch, device, compile_static if compiled else None)
    compile_seconds: float | None = None
    if compiled:
        step, compile_seconds = compiled_step_seconds(step_fn, steps, device)
    else:
        step = median(time_step(step_fn, steps, device=device))
    return {"model": model_name, "method": method,
            "variant": "bf16 channels_last" + (" compiled" if compiled else ""), "crop": list(size),
            "batch": batch, "images_per_s": batch / step, "step_s": step, "train_tflops_per_step": flops / 1e12,
            "achieved_tflops_per_s": flops / step / 1e12,
            "mfu_of_datasheet_peak": flops / step / peak if peak else None,
            "fraction_of_measured_matmul": flops / step / matmul,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if on_cuda else None,
            "compile_s": compile_seconds}


def target_ratios(rows: list[dict]) -> dict[str, float]:
    """The GPU targets' ratios of utilisation (achieved FLOP/s) at the paper's crop and largest
    batch, eager and compiled: the paper's model at single scale over the anchor (target >= 1), and
    hierarchical over single scale (target >= 0.9). A ratio whose rows did not run is left out."""
    batch = MODELS["paper"][2][-1]
    found = {(r["model"], r["method"], r["variant"].endswith("compiled")): r["achieved_tflops_per_s"]
             for r in rows if r["batch"] == batch and r["model"] in ("paper", ANCHOR)}
    ratios = {}
    for compiled, name in ((False, "eager"), (True, "compiled")):
        single, anchor = found.get(("paper", "single", compiled)), found.get((ANCHOR, "single", compiled))
        hierarchical = found.get(("paper", "hierarchical", compiled))
        if single and anchor:
            ratios[f"paper single over anchor, {name}"] = single / anchor
        if single and hierarchical:
            ratios[f"paper hierarchical over single, {name}"] = hierarchical / single
    return ratios


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
    anchor = torchvision_installed()
    if not anchor:
        print("torchvision is not installed: no anchor rows (its deeplabv3_resnet50), no ratio to it", flush=True)
    rows: list[dict] = []
    for model_name, method, batch, compiled in planned_runs(not args.no_compile, anchor):
        rows.append(measure(model_name, method, batch, compiled, args.steps, peak, matmul))
        print(describe_row(rows[-1]), flush=True)
        # Rewritten after every row (whole file, then renamed) so a run stopped by a time limit keeps
        # what it measured.
        partial = out.with_name(out.name + ".tmp")
        partial.write_text(json.dumps({"machine": machine, "matmul_bf16_tflops": matmul / 1e12,
                                       "datasheet_bf16_tflops": peak / 1e12 if peak else None, "rows": rows,
                                       "ratios": target_ratios(rows)}, indent=2))
        partial.replace(out)
    for name, ratio in target_ratios(rows).items():
        print(f"{name}: {ratio:.2f}x")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
