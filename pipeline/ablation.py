"""Stage `ablation`: the paper's method table on the configured data.

    python -m pipeline.ablation run --method hierarchical   # one method (a DVC foreach stage each)
    python -m pipeline.ablation table                       # results/ablation/table.{md,json}

Every row of ablation.methods (a method with its training and eval scales) trains through the same
Ray Train code as the `train` stage, with the same budget (ablation.epochs, crop, augmentation),
once per seed of ablation.seeds, and is evaluated at its own eval scales; rows that train alike share
their trainings. The table gives mean ± std over the seeds and, against single scale, a paired
bootstrap of the mIoU difference (components.significance).
"""

from __future__ import annotations

import json
from pathlib import Path

from components.atomic import atomic_file
from components.config import ConfigError, PipelineConfig, ablation_config
from components.data.pyramid import PyramidReader
from components.evaluation import group_indices
from components.method_table import SIGNIFICANCE, method_row, table_lines
from pipeline.runtime import ablation_seeds, output_files
from pipeline.runtime.common import run_stage


def run_method(cfg: PipelineConfig, method: str) -> list[dict]:
    """Every seed of ablation.seeds for one method (one DVC stage per method caches them together),
    as many at once as the cluster has room for; each seed is its own Ray Train run."""
    folder = Path(cfg.ablation.output_dir) / method
    method_result = output_files.OutputFile("ablation.output_dir", folder / "result.json", output_files.METHOD_RESULT)
    output_files.check_files([method_result, *ablation_seeds.seed_output_files(cfg, method)])  # now, not after training
    at_once = ablation_seeds.trainings_at_once(cfg, method)
    if at_once == 1:
        results = [ablation_seeds.run_seed(cfg, method, seed) for seed in cfg.ablation.seeds]
    else:
        results = ablation_seeds.run_seeds_concurrently(cfg, method, at_once)
    with atomic_file(folder / "result.json", output_files.METHOD_RESULT) as handle:
        json.dump({"method": method, "seeds": results}, handle, indent=2)
    return results


def summarize_methods(cfg: PipelineConfig, classes: dict) -> list[dict]:
    """Per method: mean and std over seeds of each metric, and against single scale the paired
    bootstrap of the mIoU and thin-class mIoU differences (components.method_table)."""
    loaded = {method: ablation_seeds.load_method(cfg, method) for method in cfg.ablation.methods}
    baseline = loaded.get("single")
    return [method_row(seeds, matrices, None if baseline is None or method == "single" else baseline[1],
                       cfg.ablation.bootstrap_rounds, group_indices(classes).get("thin_small"))
            for method, (seeds, matrices) in loaded.items()]


def write_table(cfg: PipelineConfig) -> list[dict]:
    classes = PyramidReader(cfg.pyramid.output).manifest["classes"]
    rows = summarize_methods(cfg, classes)
    rounds = cfg.ablation.bootstrap_rounds
    lines = table_lines(rows, rounds)
    run = ablation_config(cfg, next(iter(cfg.ablation.methods)))  # the table's model size and loader
    model = run.model
    budget = (f"\nBudget: {cfg.ablation.epochs} epochs, crop {cfg.ablation.crop_size[0]}x{cfg.ablation.crop_size[1]}, "
              f"batch {cfg.train.batch_size}, {model.trunk} at output stride {model.output_stride} with "
              f"{model.decoder}, random scales {cfg.ablation.random_scales}, class-uniform share "
              f"{run.loader.class_uniform}, seeds {cfg.ablation.seeds}. mIoU on the val split, mean ± std over "
              "the seeds. 'mIoU vs single': the mean paired difference with its 95% interval and two-sided p "
              f"from a bootstrap over seed pairs and val images ({rounds} rounds; * marks p < {SIGNIFICANCE}). "
              "Minibatch time and peak RSS measured in the training worker; activations = bytes autograd "
              "saves for backward (one minibatch).\n")
    out = Path(cfg.ablation.output_dir)
    with atomic_file(out / "table.md", output_files.ABLATION_TABLE) as handle:
        handle.write("\n".join(lines) + "\n" + budget)
    with atomic_file(out / "table.json", output_files.ABLATION_ROWS) as handle:
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
