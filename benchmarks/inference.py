"""Inference latency per scale set against what its FLOPs predict, batched, and through the
registered (pyfunc) model, in one run.

    .venv/bin/python -m benchmarks.inference [--params params.yaml] [--repeats 5]

The prediction for a set is the 1.0-only latency times the set's FLOPs over 1.0's: a set that
costs more than its FLOPs say (resizes, small inefficient convolutions at low scales, attention
heads) shows a ratio above 1. The model is the default one of params.yaml at the bundled images'
size, at the training precision; latency does not depend on the weights, so they are random.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.steps import median
from components.config import PipelineConfig, load_config
from components.flops import inference_flops
from components.models import build_model
from components.training import autocast_dtype


def batched_latency(model, scales, size, batch: int, repeats: int, dtype) -> float:
    images = torch.randn(batch, 3, *size)
    timings = []
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        for step in range(repeats + 1):
            start = time.perf_counter()
            model(images, scales).fused.argmax(1)
            if step:
                timings.append(time.perf_counter() - start)
    return median(timings) / batch


def all_sets_latency(model, scale_sets, size, batch: int, repeats: int, dtype) -> float:
    """Per-image seconds of every set of `scale_sets` at once, each distinct scale run once
    (MultiScaleSegmenter.forward_sets, what evaluation does)."""
    images = torch.randn(batch, 3, *size)
    timings = []
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        for step in range(repeats + 1):
            start = time.perf_counter()
            for output in model.forward_sets(images, scale_sets):
                output.fused.argmax(1)
            if step:
                timings.append(time.perf_counter() - start)
    return median(timings) / batch


def pyfunc_latency(model_cfg, size, scales, repeats: int) -> tuple[float, float]:
    """(per-image seconds through mlflow.pyfunc with PNG decoding, the same model called directly)."""
    import mlflow
    import pandas as pd
    from PIL import Image

    from components.models import save_model
    from pipeline.runtime import tracking

    model = build_model(model_cfg).eval()
    image = np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    frame = pd.DataFrame({"image": [buffer.getvalue()]})
    with tempfile.TemporaryDirectory(prefix="hmsa-bench-") as tmp:
        save_model(model, model_cfg, Path(tmp) / "model")
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        with mlflow.start_run():
            uri = tracking.log_saved_model(Path(tmp) / "model", scales)
        served = mlflow.pyfunc.load_model(uri)
        served.predict(frame, params={"scales": scales})
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            served.predict(frame, params={"scales": scales})
            timings.append(time.perf_counter() - start)
        direct = batched_latency(served.unwrap_python_model().model, scales, size, 1, repeats, None)
    return median(timings), direct


def run(params: str, repeats: int) -> dict:
    cfg: PipelineConfig = load_config(params)
    size = (cfg.prepare.synthetic.height, cfg.prepare.synthetic.width)
    model_cfg = cfg.model.model_copy(update={"pretrained": None})
    model = build_model(model_cfg).eval()
    dtype = autocast_dtype(cfg.train.precision, torch.device("cpu"))
    batch = cfg.evaluate.batch_size
    rows = []
    base = None
    for scales in cfg.evaluate.scale_sets:
        flops = inference_flops(model_cfg, scales, size)
        latency = batched_latency(model, scales, size, batch, repeats, dtype)
        base = base or (latency, flops) if scales == [1.0] else base
        rows.append({"scales": scales, "gflops": flops / 1e9, "latency_ms": 1000 * latency})
    if base is None:
        base = (batched_latency(model, [1.0], size, batch, repeats, dtype), inference_flops(model_cfg, [1.0], size))
    for row in rows:
        row["predicted_ms"] = 1000 * base[0] * row["gflops"] * 1e9 / base[1]
        row["measured_over_predicted"] = row["latency_ms"] / row["predicted_ms"]
        print(f"  {row['scales']!s:22s} {row['gflops']:6.2f} GFLOPs  {row['latency_ms']:7.1f} ms/image "
              f"(batch {batch})  predicted {row['predicted_ms']:7.1f}  -> {row['measured_over_predicted']:.2f}x")
    separate = sum(row["latency_ms"] for row in rows)
    together = 1000 * all_sets_latency(model, cfg.evaluate.scale_sets, size, batch, repeats, dtype)
    print(f"  all {len(rows)} sets at once, each scale run once: {together:.1f} ms/image against {separate:.1f} "
          f"one set after another -> {together / separate:.2f}x")
    served_scales = model_cfg.train_scales
    pyfunc, direct = pyfunc_latency(model_cfg, size, served_scales, repeats)
    print(f"  pyfunc at {served_scales}: {1000 * pyfunc:.1f} ms/image against {1000 * direct:.1f} direct "
          f"-> {pyfunc / direct:.2f}x")
    return {"image_size": list(size), "batch": batch, "precision": str(dtype or "fp32"), "scale_sets": rows,
            "all_sets": {"ms_per_image": together, "one_after_another_ms_per_image": separate,
                         "ratio": together / separate},
            "pyfunc": {"scales": served_scales, "ms_per_image": 1000 * pyfunc, "direct_ms_per_image": 1000 * direct,
                       "ratio": pyfunc / direct}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    run(args.params, args.repeats)


if __name__ == "__main__":
    main()
