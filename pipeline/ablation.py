"""Stage `ablation`: the paper's method table on the configured data.

    python -m pipeline.ablation run --method hierarchical   # one method (a DVC foreach stage each)
    python -m pipeline.ablation table                       # results/ablation/table.{md,json}

Every method trains through the same Ray Train code as the `train` stage, with the same budget
(ablation.epochs, crop, augmentation), and is evaluated at its own eval scales.
"""

from __future__ import annotations

import json
from pathlib import Path

from components.atomic import atomic_file
from components.config import ConfigError, PipelineConfig, ablation_config
from components.flops import train_step_flops
from components.memory import saved_activation_bytes
from components.models import load_saved_model
from components.scales import scale_set_key
from pipeline import evaluate, train
from pipeline.common import run_stage

COLUMNS = ["method", "train scales", "eval scales", "mIoU", "thin mIoU", "large mIoU",
           "train FLOPs vs single", "minibatch s", "peak RSS MB", "activations MB"]


def run_method(cfg: PipelineConfig, method: str) -> dict:
    run_cfg = ablation_config(cfg, method)
    train.main(run_cfg)
    model, model_cfg = load_saved_model(run_cfg.train.output)
    (row,) = evaluate.evaluate_all(run_cfg, model, model_cfg, run_cfg.evaluate.scale_sets, flip=False)
    trained = json.loads(Path(run_cfg.train.metrics).read_text())
    crop = tuple(cfg.ablation.crop_size)
    single = run_cfg.model.model_copy(update={"method": "single", "train_scales": [1.0]})
    result = {
        "method": method,
        "train_scales": run_cfg.model.train_scales,
        "eval_scales": row["scales"],
        "miou": row["miou"],
        "thin_miou": row["thin_miou"],
        "large_miou": row["large_miou"],
        "train_flops_vs_single": train_step_flops(run_cfg.model, crop) / train_step_flops(single, crop),
        "minibatch_seconds": trained["step_seconds"],
        "peak_rss_mb": trained["peak_memory_mb"],
        "activation_mb": saved_activation_bytes(run_cfg.model, crop, run_cfg.train.batch_size) / 2**20,
        "eval_gflops": row["gflops"],
        "epochs": trained["epochs"],
    }
    with atomic_file(Path(cfg.ablation.output_dir) / method / "result.json", "w") as handle:
        json.dump(result, handle, indent=2)
    return result


def write_table(cfg: PipelineConfig) -> list[dict]:
    rows = []
    for method in cfg.ablation.methods:
        path = Path(cfg.ablation.output_dir) / method / "result.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run `dvc repro ablation` (or the run for {method!r})")
        rows.append(json.loads(path.read_text()))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(
            f"| {r['method']} | {scale_set_key(r['train_scales'], ', ')} | {scale_set_key(r['eval_scales'], ', ')} | {r['miou']:.4f} | "
            f"{r['thin_miou']:.4f} | {r['large_miou']:.4f} | {r['train_flops_vs_single']:.2f}x | "
            f"{r['minibatch_seconds']:.3f} | {r['peak_rss_mb']:.0f} | {r['activation_mb']:.1f} |"
        )
    budget = (f"\nBudget: {cfg.ablation.epochs} epochs, crop {cfg.ablation.crop_size[0]}x{cfg.ablation.crop_size[1]}, "
              f"batch {cfg.train.batch_size}, {cfg.model.trunk}/{cfg.model.decoder}, random scales "
              f"{cfg.ablation.random_scales}. mIoU on the val split; minibatch time and peak RSS measured "
              "in the training worker; activations = bytes autograd saves for backward (one minibatch).\n")
    out = Path(cfg.ablation.output_dir)
    with atomic_file(out / "table.md", "w") as handle:
        handle.write("\n".join(lines) + "\n" + budget)
    with atomic_file(out / "table.json", "w") as handle:
        json.dump(rows, handle, indent=2)
    print("\n".join(lines))
    return rows


def main(cfg: PipelineConfig, args) -> None:
    if args.command == "run":
        if not args.method:
            raise ConfigError("ablation run needs --method (one of ablation.methods)")
        run_method(cfg, args.method)
    else:
        write_table(cfg)


def _arguments(parser) -> None:
    parser.add_argument("command", choices=["run", "table"])
    parser.add_argument("--method", help="with run: which entry of ablation.methods")


if __name__ == "__main__":
    run_stage(main, __doc__, _arguments)
