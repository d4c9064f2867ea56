"""The paper's cost table on this machine, hardware efficiency, and the data path, in one run.

    .venv/bin/python -m benchmarks.training_cost [--steps 5] [--params params.yaml]

- Cost per method (the methods and training scales of ablation.methods; the model, crop and batch
  of params.yaml): training FLOPs per minibatch (counted), median minibatch time after warm-up,
  and training memory, each relative to single scale, and explicit over hierarchical. Each method
  runs in a fresh process, so its peak RSS is its own; "activations" are the bytes autograd saves
  for the backward pass (counted exactly; the part of training memory that scales multiply).
- Efficiency: the default model's achieved training FLOP/s over the dense matmul FLOP/s measured
  in the same run, fp32 and, where the hardware has it, bf16.
- Data path: samples/s of the training loader (loader.workers) against what training consumes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.steps import (
    compile_static,
    compiled_step_seconds,
    conv_matmul_flops_per_second,
    in_fresh_process,
    matmul_flops_per_second,
    median,
    time_training_steps,
    training_step,
)
from components.config import ModelConfig, PipelineConfig, load_config
from components.flops import train_step_flops
from components.memory import saved_activation_bytes
from components.training import cpu_supports_bf16


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _measure_in_child(cfg_json: dict, size, batch, steps, threads, queue) -> None:
    torch.set_num_threads(threads)
    cfg = ModelConfig.model_validate(cfg_json)
    before = _status_kib("VmRSS")
    timings = time_training_steps(cfg, size, batch, steps)
    queue.put({"median_s": median(timings), "timings_s": timings,
               "peak_rss_mb": _status_kib("VmHWM") / 1024, "training_rss_mb": (_status_kib("VmHWM") - before) / 1024})


def measure_method(cfg: ModelConfig, size, batch: int, steps: int, threads: int) -> dict:
    return in_fresh_process(_measure_in_child, cfg.model_dump(mode="json"), size, batch, steps, threads)


def cost_table(cfg: PipelineConfig, steps: int, threads: int) -> list[dict]:
    size, batch = tuple(cfg.train.crop_size), cfg.train.batch_size
    rows, measured = [], set()
    for row, entry in cfg.ablation.methods.items():
        method = cfg.ablation.method_of(row)
        if (method, tuple(entry.train_scales)) in measured:  # a row that differs at inference only
            continue
        measured.add((method, tuple(entry.train_scales)))
        model = cfg.model.model_copy(update={"method": method, "train_scales": entry.train_scales, "pretrained": None})
        row = {"method": method, "train_scales": entry.train_scales,
               "train_gflops": train_step_flops(model, size, batch) / 1e9,
               "activation_mb": saved_activation_bytes(model, size, batch) / 2**20}
        row.update(measure_method(model, size, batch, steps, threads))
        rows.append(row)
        print(f"  {method:13s} {row['train_gflops']:8.1f} GFLOPs  {row['median_s']:6.3f} s/minibatch  "
              f"{row['training_rss_mb']:7.0f} MB training RSS  {row['activation_mb']:7.0f} MB activations")
    single = next(r for r in rows if r["method"] == "single")
    for row in rows:
        for key in ("train_gflops", "median_s", "training_rss_mb", "activation_mb"):
            row[f"{key}_vs_single"] = row[key] / single[key]
    return rows


def explicit_over_hierarchical(rows: list[dict]) -> dict:
    by = {r["method"]: r for r in rows}
    if not {"explicit", "hierarchical"} <= set(by):
        return {}
    e, h = by["explicit"], by["hierarchical"]
    return {key: e[key] / h[key] for key in ("train_gflops", "median_s", "training_rss_mb", "activation_mb")}


def efficiency(cfg: PipelineConfig, steps: int) -> dict:
    size, batch = tuple(cfg.train.crop_size), cfg.train.batch_size
    model = cfg.model.model_copy(update={"pretrained": None})
    flops = train_step_flops(model, size, batch)
    result = {"train_gflops_per_step": flops / 1e9, "threads": torch.get_num_threads()}
    precisions = [("fp32", None, torch.float32)]
    if cpu_supports_bf16():
        precisions.append(("bf16", torch.bfloat16, torch.bfloat16))
    for name, autocast_dtype, matmul_dtype in precisions:
        step = median(time_training_steps(model, size, batch, steps, dtype=autocast_dtype))
        mm, conv = matmul_flops_per_second(matmul_dtype), conv_matmul_flops_per_second(matmul_dtype)
        peak = max(mm, conv)
        result[name] = {"median_step_s": step, "train_gflops_per_s": flops / step / 1e9,
                        "matmul_gflops_per_s": peak / 1e9, "torch_mm_gflops_per_s": mm / 1e9,
                        "conv1x1_gflops_per_s": conv / 1e9, "fraction_of_matmul": flops / step / peak,
                        "images_per_s": batch / step}
        print(f"  {name}: {flops / step / 1e9:6.1f} GFLOP/s training, {peak / 1e9:6.1f} GFLOP/s matmul "
              f"-> {flops / step / peak:.2f}")
    if "bf16" in result:
        result["bf16_speedup"] = result["fp32"]["median_step_s"] / result["bf16"]["median_step_s"]
    result["compile"] = compile_gain(model, size, batch, steps, "bf16" if "bf16" in result else "fp32", result)
    return result


def compile_gain(model, size, batch: int, steps: int, precision: str, measured: dict) -> dict:
    """torch.compile of the training step at the fastest precision: (median step, compile seconds);
    it pays when the saving per step times the steps of a run exceeds the compile time."""
    dtype = torch.bfloat16 if precision == "bf16" else None
    try:
        step, compile_seconds = compiled_step_seconds(training_step(model, size, batch, dtype, wrap=compile_static),
                                                      steps)
    except Exception as err:  # noqa: BLE001 - a missing C++ compiler, an unsupported op: reported, not fatal
        print(f"  torch.compile: not measured ({type(err).__name__}: {str(err)[:200]})")
        return {"error": f"{type(err).__name__}: {str(err)[:500]}"}
    eager = measured[precision]["median_step_s"]
    saving = eager - step
    result = {"precision": precision, "eager_step_s": eager, "compiled_step_s": step, "speedup": eager / step,
              "compile_s": compile_seconds,
              "break_even_steps": compile_seconds / saving if saving > 0 else None}
    print(f"  torch.compile ({precision}): {step:.3f} s/step against {eager:.3f} eager ({eager / step:.2f}x), "
          f"compile {compile_seconds:.0f} s" + (f", pays after {result['break_even_steps']:.0f} steps"
                                                if saving > 0 else ", never pays"))
    return result


def data_path(cfg: PipelineConfig, consumed_images_per_s: float, batches: int = 12) -> dict:
    from torch.utils.data import DataLoader

    from components.data.dataset import PyramidTrainDataset, loader_settings
    from components.data.prepare import prepare_dataset
    from components.data.pyramid import PyramidReader, build_pyramid
    from components.data.readers import read_cityscapes
    from components.data.synthetic import write_cityscapes_layout
    from components.storage import Storage

    synthetic = cfg.prepare.synthetic
    with tempfile.TemporaryDirectory(prefix="hmsa-bench-") as tmp:
        root = Path(tmp)
        write_cityscapes_layout(root / "cs", {"train": 24, "val": 1}, synthetic.height, synthetic.width, seed=0)
        prepare_dataset(read_cityscapes(root / "cs"), root / "raw")
        build_pyramid(root / "raw", cfg.pyramid.scales, cfg.pyramid.shard_size, Storage(), str(root / "pyramid"))
        dataset = PyramidTrainDataset(PyramidReader(str(root / "pyramid")), "train", cfg.model.train_scales,
                                      tuple(cfg.train.crop_size), cfg.loader)
        settings = loader_settings(cfg.loader, torch.get_num_threads())
        loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True, **settings)
        iterator, seen = iter(loader), 0
        next(iterator)  # workers started before timing
        start = time.perf_counter()
        while seen < batches * cfg.train.batch_size:
            try:
                seen += next(iterator)["label"].shape[0]
            except StopIteration:
                iterator = iter(loader)
        rate = seen / (time.perf_counter() - start)
    print(f"  loader ({settings['num_workers']} workers): {rate:.1f} samples/s; training consumes "
          f"{consumed_images_per_s:.1f} -> {rate / consumed_images_per_s:.1f}x")
    return {"loader_workers": settings["num_workers"], "loader_samples_per_s": rate,
            "training_images_per_s": consumed_images_per_s, "ratio": rate / consumed_images_per_s}


def run(params: str, steps: int) -> dict:
    cfg = load_config(params)
    threads = torch.get_num_threads()
    print("cost per method:")
    rows = cost_table(cfg, steps, threads)
    print("hardware efficiency:")
    eff = efficiency(cfg, steps)
    best = eff.get("bf16", eff["fp32"]) if cfg.train.precision in ("auto", "bf16") else eff["fp32"]
    print("data path:")
    data = data_path(cfg, best["images_per_s"])
    return {
        "model": cfg.model.model_dump(mode="json"),
        "crop": list(cfg.train.crop_size),
        "batch": cfg.train.batch_size,
        "methods": rows,
        "explicit_over_hierarchical": explicit_over_hierarchical(rows),
        "efficiency": eff,
        "data_path": data,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(run(args.params, args.steps)["explicit_over_hierarchical"])


if __name__ == "__main__":
    main()
