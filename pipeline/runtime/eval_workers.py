"""Evaluation as Ray work, shared by `evaluate`, `eval-scales` and the ablation's evaluations.

The val split is cut into one contiguous shard per worker (ray.num_workers, at most, each with
ray.cpus_per_worker CPUs and a GPU when the cluster has them, as in training); every task loads
the model once, reads its images from the pyramid the launch placed where every node can read it,
runs all scale sets in batches at the training precision, and returns a confusion matrix and
the forward seconds per set. The driver sums the matrices, so the metrics equal a single pass.
Latency is what the worker's device measured, reported with the device's name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from components.config import ModelConfig, PipelineConfig
from components.evaluation import attention_means, evaluate_shard, merge_shards, pareto_front, summarize
from components.flops import inference_flops
from components.methods import has_attention
from components.models.saved import CONFIG_FILE, WEIGHTS_FILE, write_model_files
from components.training import autocast_dtype
from pipeline.runtime.launch import Launch, check_classes, prepare_launch


def evaluate_all(cfg: PipelineConfig, model, model_cfg, scale_sets: list[list[float]], flip: bool,
                 launch=None, attention: bool = False, per_image: bool = False) -> list[dict]:
    """Every scale set on the val split of cfg.pyramid.output, as Ray work (evaluate_on_ray below),
    with the Pareto front over (GFLOPs, mIoU) marked. With `attention`, the widest set's row also
    carries `attention_by_class` (region -> scale -> mean share per class, components.evaluation
    .attention_means), from the same forward pass."""
    widest = max(range(len(scale_sets)), key=lambda i: len(scale_sets[i]))
    wanted = attention and has_attention(model_cfg.method)
    rows, means = evaluate_on_ray(cfg, model, model_cfg, scale_sets, flip, launch, widest if wanted else None,
                                  per_image=per_image)
    for row, front in zip(rows, pareto_front(rows), strict=True):
        row["pareto"] = front
    if means is not None:
        rows[widest]["attention_by_class"] = means
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU ({torch.get_num_threads()} threads)"


def _evaluate_task(model_files: dict[str, bytes], pyramid_uri: str, indices: list[int],
                   scale_sets: list[list[float]], flip: bool, batch_size: int, precision: str,
                   use_gpu: bool, attention_set: int | None) -> dict:
    """One shard, on a Ray worker: everything it needs comes in its arguments or from storage."""
    from components.data.dataset import PyramidEvalDataset
    from components.data.pyramid import PyramidReader
    from components.models import load_saved_model
    from pipeline.runtime.environment import Environment

    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory(prefix="hmsa-eval-model-") as directory:
        for name, data in model_files.items():
            (Path(directory) / name).write_bytes(data)
        model, _ = load_saved_model(directory)
    device = torch.device("cuda" if use_gpu else "cpu")
    model = model.to(device)
    reader = PyramidReader(pyramid_uri, Environment.from_environ().storage(pyramid_uri))
    widest = sorted({s for scales in scale_sets for s in scales})
    dataset = PyramidEvalDataset(reader, "val", widest)
    results = evaluate_shard(model, dataset, indices, scale_sets, reader.num_classes, flip=flip,
                             batch_size=batch_size, dtype=autocast_dtype(precision, device), device=device,
                             attention_set=attention_set)
    return {"results": results, "device": device_name(device), "node": os.uname().nodename}


def shards(count: int, parts: int) -> list[list[int]]:
    """`count` indices in `parts` contiguous, nearly equal shards (none empty)."""
    parts = max(1, min(parts, count))
    bounds = [round(i * count / parts) for i in range(parts + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(parts)]


def evaluate_on_ray(cfg: PipelineConfig, model, model_cfg: ModelConfig, scale_sets: list[list[float]],
                    flip: bool, launch: Launch | None = None, attention_set: int | None = None,
                    per_image: bool = False) -> tuple[list[dict], dict | None]:
    """Metrics of `model` at each scale set on the val split of cfg.pyramid.output, computed by Ray
    workers: rows as components.evaluation.summarize gives them, plus `gflops`, `latency_device` and
    `eval_workers`; and, when `attention_set` is given, the mean attention by class of that set
    (components.evaluation.attention_means). With `per_image`, each row also has `image_matrices`
    (one confusion matrix per val image, in order). A scale set the method cannot use fails here,
    before any work."""
    import ray

    from components.data.dataset import PyramidEvalDataset
    from components.data.pyramid import PyramidReader

    for scales in scale_sets:
        model.check_scales(scales)
    check_classes(model_cfg.num_classes, cfg.pyramid.output, key="the evaluated model's num_classes")
    reader = PyramidReader(cfg.pyramid.output)
    count = len(reader.entries("val"))
    size = tuple(PyramidEvalDataset(reader, "val", [1.0])[0]["label"].shape)  # for the FLOPs of a val image
    launch = launch or prepare_launch(cfg, trains=False)
    with tempfile.TemporaryDirectory(prefix="hmsa-eval-model-") as directory:
        write_model_files(model, model_cfg, directory)  # the same bytes whatever the model came from
        model_ref = ray.put({name: (Path(directory) / name).read_bytes() for name in (WEIGHTS_FILE, CONFIG_FILE)})
    resources = {"num_cpus": cfg.ray.cpus_per_worker, "num_gpus": cfg.ray.gpus_per_worker if launch.use_gpu else 0}
    task = ray.remote(**resources)(_evaluate_task)
    work = shards(count, cfg.ray.worker_range[1])
    answers = ray.get([task.remote(model_ref, launch.pyramid_uri, indices, scale_sets, flip, cfg.evaluate.batch_size,
                                   cfg.train.precision, launch.use_gpu, attention_set) for indices in work])
    rows, attention = [], None
    for merged in merge_shards([answer["results"] for answer in answers]):
        attention = attention_means(merged) or attention
        row = summarize(merged, reader.manifest["classes"])
        row["gflops"] = inference_flops(model_cfg, row["scales"], size) * (2 if flip else 1) / 1e9
        row["latency_device"] = answers[0]["device"]
        row["eval_workers"] = len(work)
        if per_image:
            row["image_matrices"] = merged["image_matrices"]
        rows.append(row)
    return rows, attention
