"""Stage `eval-scales`, the inference-scale search: evaluate a trained model at every candidate of
eval_scales.scale_sets.

No retraining: hierarchical attention is learned between adjacent scales, so any set containing
1.0 can be evaluated with the weights as they are. Writes eval_scales.table (mIoU and GFLOPs per
set, Pareto front marked), eval_scales.image_matrices (per set, one confusion matrix per val image:
the registry gate's evidence) and, last, eval_scales.recommendation (the best mIoU within
eval_scales.max_gflops, and the SHA-256 of the matrices it goes with).
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import yaml

from components.atomic import atomic_file
from components.config import PipelineConfig
from components.scales import scale_set_key
from pipeline.runtime import output_files
from pipeline.runtime.common import run_stage
from pipeline.runtime.eval_workers import evaluate_all
from pipeline.runtime.model_source import load_model


def recommend(rows: list[dict], max_gflops: float | None) -> dict | None:
    affordable = [r for r in rows if max_gflops is None or r["gflops"] <= max_gflops]
    return max(affordable, key=lambda r: r["miou"]) if affordable else None


def search_eval_scales(cfg: PipelineConfig) -> dict:
    output_files.check_files(output_files.eval_scales_files(cfg))  # a refusal now, not after the evaluations
    model, model_cfg = load_model(cfg.evaluate.model or cfg.train.output, cfg)
    es = cfg.eval_scales
    names = list(es.scale_sets)
    rows = evaluate_all(cfg, model, model_cfg, [es.scale_sets[n] for n in names], flip=False, per_image=True)
    for name, row in zip(names, rows, strict=True):
        row["name"] = name
    best = recommend(rows, es.max_gflops)
    images = Path(es.image_matrices)
    with atomic_file(images, output_files.NUMPY_ARCHIVE, "wb") as handle:
        np.savez_compressed(handle, **{r["name"]: r.pop("image_matrices") for r in rows})
    with atomic_file(es.table, output_files.EVAL_SCALES_TABLE) as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "scales", "gflops", "miou", "thin_miou", "large_miou", "latency_ms", "pareto"])
        for r in rows:
            writer.writerow([r["name"], scale_set_key(r["scales"], " "), r["gflops"], r["miou"],
                             r["thin_miou"], r["large_miou"], r["latency_ms"], int(r["pareto"])])
    document = {
        "max_gflops": es.max_gflops,
        "recommended": None if best is None else {"name": best["name"], "scales": best["scales"],
                                                  "miou": best["miou"], "gflops": best["gflops"]},
        "pareto_front": [r["name"] for r in rows if r["pareto"]],
        # written last, naming the per-image file it goes with: a kill between the two writes is
        # then seen by the gate instead of judging with another run's matrices
        "per_image": {"file": str(images), "sha256": hashlib.sha256(images.read_bytes()).hexdigest()},
    }
    if best is None:
        document["reason"] = f"no candidate is within eval_scales.max_gflops = {es.max_gflops}"
    with atomic_file(es.recommendation, output_files.EVAL_SCALES_CHOICE) as handle:
        yaml.safe_dump(document, handle, sort_keys=False)
    for r in rows:
        print(f"{r['name']:12s} {r['scales']!s:24s} mIoU {r['miou']:.4f}  {r['gflops']:7.2f} GFLOPs"
              f"{'  pareto' if r['pareto'] else ''}")
    print(f"recommended: {document['recommended']}")
    return document


if __name__ == "__main__":
    run_stage(search_eval_scales, __doc__)
