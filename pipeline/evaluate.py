"""Stage `evaluate`: the val split at every scale set of evaluate.scale_sets.

Writes <output_dir>/metrics.json (per set: mIoU, thin/small and large mIoU, GFLOPs and latency
per image), iou_by_class.json (per set: each class's IoU), image_matrices.npz (per set, one
confusion matrix per val image: the registry gate's evidence), pareto.csv (mIoU against GFLOPs, Pareto front marked),
attention_by_class.json (each scale's mean share of the fused prediction per class),
attention_by_region.json (the same inside regions and on their boundaries), and attention/*.png
pictures; logs the same to an MLflow run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from components.atomic import atomic_dir
from components.config import PipelineConfig
from components.data.dataset import PyramidEvalDataset
from components.data.pyramid import PyramidReader
from components.scales import scale_set_key
from components.viz import attention_figure
from pipeline.runtime import cluster, output_files, tracking
from pipeline.runtime.common import run_stage
from pipeline.runtime.environment import Environment
from pipeline.runtime.eval_workers import evaluate_all
from pipeline.runtime.model_source import load_model


def write_outputs(out: Path, rows: list[dict], model, model_cfg, reader: PyramidReader, pictures: int) -> None:
    classes = reader.manifest["classes"]
    with open(out / output_files.EVALUATE_IMAGES, "wb") as handle:
        np.savez_compressed(handle, **{scale_set_key(r["scales"]): r.pop("image_matrices") for r in rows})
    attention = next((r.pop("attention_by_class") for r in rows if "attention_by_class" in r), None)
    # Per-class IoU in a file of its own: `dvc exp show` shows every value of a metrics file as a
    # column, and 19 classes per scale set buried the figures a person compares.
    summary = {scale_set_key(r["scales"]): {k: v for k, v in r.items() if k != "iou"} for r in rows}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    by_class = {scale_set_key(r["scales"]): r["iou"] for r in rows}
    (out / "iou_by_class.json").write_text(json.dumps(by_class, indent=2) + "\n")
    with open(out / "pareto.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["scales", "gflops", "miou", "thin_miou", "large_miou", "latency_ms", "pareto"])
        for r in rows:
            writer.writerow([scale_set_key(r["scales"]), r["gflops"], r["miou"], r["thin_miou"], r["large_miou"],
                             r["latency_ms"], int(r["pareto"])])
    if attention is not None:
        tables = {
            region: {
                f"{s:g}": {n: (None if np.isnan(v) else float(v)) for n, v in zip(classes["names"], means, strict=True)}
                for s, means in by_scale.items()
            }
            for region, by_scale in attention.items()
        }
        (out / "attention_by_class.json").write_text(json.dumps(tables.pop("all"), indent=2) + "\n")
        (out / "attention_by_region.json").write_text(json.dumps(tables, indent=2) + "\n")
    widest = max((r["scales"] for r in rows), key=len)
    (out / "attention").mkdir()
    dataset = PyramidEvalDataset(reader, "val", widest)
    for i in range(min(pictures, len(dataset))):
        attention_figure(model, dataset[i], widest, classes["colors"]).save(out / "attention" / f"val_{i:02d}.png")


def evaluation_key(cfg: PipelineConfig, model, reader: PyramidReader) -> str:
    """What this evaluation is: the model's weights and config, the val data, the evaluation
    settings and the code. The same key reuses its MLflow run (a rerun, or one after a kill that left
    it RUNNING), so no evaluation is ever recorded twice."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(
        json.dumps(
            {
                "evaluate": cfg.evaluate.model_dump(mode="json", exclude={"model", "output_dir"}),
                "data": reader.manifest["source_manifest"],
                "code": cluster.code_fingerprint(),
                "precision": cfg.train.precision,
            },
            sort_keys=True,
        ).encode()
    )
    return f"evaluate-{digest.hexdigest()[:12]}"


def _log_to_mlflow(cfg: PipelineConfig, source: str, model, model_cfg, rows: list[dict], reader) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    experiment_id = tracking.setup_experiment(Environment.from_environ(), cfg.mlflow.experiment)
    run_id = tracking.find_or_create_run(
        experiment_id,
        evaluation_key(cfg, model, reader),
        f"evaluate-{model_cfg.method}",
        {"stage": "evaluate", "model_source": source, "method": model_cfg.method},
    )
    client = MlflowClient()
    with tracking.run_status(run_id):
        metrics, now = [], int(time.time() * 1000)
        for r in rows:
            tag = scale_set_key(r["scales"], "_")
            metrics += [
                Metric(f"{name}_{tag}", float(r[key]), now, 0)
                for name, key in (
                    ("miou", "miou"),
                    ("gflops", "gflops"),
                    ("thin_miou", "thin_miou"),
                    ("large_miou", "large_miou"),
                )
            ]
        client.log_batch(run_id, metrics=metrics)
        client.log_artifacts(run_id, cfg.evaluate.output_dir, artifact_path="eval")


def main(cfg: PipelineConfig) -> None:
    source = cfg.evaluate.model or cfg.train.output
    model, model_cfg = load_model(source, cfg)
    reader = PyramidReader(cfg.pyramid.output)
    torch.set_grad_enabled(False)
    rows = evaluate_all(cfg, model, model_cfg, cfg.evaluate.scale_sets, cfg.evaluate.flip, attention=True,
                        per_image=True)
    with atomic_dir(cfg.evaluate.output_dir, key="evaluate.output_dir") as out:
        write_outputs(out, rows, model, model_cfg, reader, cfg.evaluate.pictures)
    _log_to_mlflow(cfg, source, model, model_cfg, rows, reader)
    for r in rows:
        print(
            f"{r['scales']!s:28s} mIoU {r['miou']:.4f}  thin {r['thin_miou']:.4f}  large {r['large_miou']:.4f}  "
            f"{r['gflops']:7.2f} GFLOPs  {r['latency_ms']:7.1f} ms{'  pareto' if r['pareto'] else ''}"
        )
    print(f"evaluated by {rows[0]['eval_workers']} Ray worker(s); latency per image on {rows[0]['latency_device']}")


if __name__ == "__main__":
    run_stage(main, __doc__)
