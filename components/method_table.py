"""The paper's method table from the ablation's results: per method the mean and spread over seeds,
and against single scale the paired bootstrap of the mIoU difference over seed pairs and val images
(components.significance); then the table's markdown rows. Pure functions: the ablation stage
loads the seeds' results and writes what these give.
"""

from __future__ import annotations

import numpy as np

from components.scales import scale_set_key
from components.significance import paired_bootstrap

COLUMNS = ["method", "train scales", "eval scales", "mIoU", "thin mIoU", "large mIoU", "mIoU vs single [95% CI]",
           "p", "train FLOPs vs single", "minibatch s", "peak RSS MB", "activations MB"]
SIGNIFICANCE = 0.05


def _mean_std(values: list[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(np.nanmean(array)), "std": float(np.nanstd(array, ddof=1)) if len(array) > 1 else 0.0,
            "values": [float(v) for v in array]}


def method_row(seeds: list[dict], matrices: np.ndarray, single: np.ndarray | None, rounds: int,
               thin: list[int] | None) -> dict:
    """One method's row from its seeds' results (the same method, fusion and budget) and their
    per-image confusion matrices (seeds, images, C, C); against `single`'s matrices when given."""
    first = seeds[0]
    row = {key: first[key] for key in ("method", "fusion", "train_scales", "eval_scales", "train_flops_vs_single",
                                         "activation_mb", "eval_gflops", "epochs")}
    row["seeds"] = [r["seed"] for r in seeds]
    for key in ("miou", "thin_miou", "large_miou", "minibatch_seconds", "peak_rss_mb"):
        row[key] = _mean_std([r[key] for r in seeds])
    if single is not None:
        row["vs_single"] = paired_bootstrap(matrices, single, rounds)
        if thin:
            row["thin_vs_single"] = paired_bootstrap(matrices, single, rounds, classes=thin)
    return row


def table_lines(rows: list[dict], rounds: int) -> list[str]:
    """The markdown table of `rows` (method_row's), header first."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        difference, p = _versus(r, rounds)
        lines.append(
            f"| {r['method']} | {scale_set_key(r['train_scales'], ', ')} | {scale_set_key(r['eval_scales'], ', ')} | "
            f"{_pm(r['miou'])} | {_pm(r['thin_miou'])} | {_pm(r['large_miou'])} | {difference} | {p} | "
            f"{r['train_flops_vs_single']:.2f}x | {r['minibatch_seconds']['mean']:.3f} | "
            f"{r['peak_rss_mb']['mean']:.0f} | {r['activation_mb']:.1f} |"
        )
    return lines


def _pm(stat: dict, digits: int = 4) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _versus(row: dict, rounds: int) -> tuple[str, str]:
    test = row.get("vs_single")
    if test is None:
        return "—", "—"
    low, high = test["ci95"]
    p = f"<{1 / rounds:.4f}" if test["p_value"] == 0 else f"{test['p_value']:.3f}"
    mark = " *" if test["p_value"] < SIGNIFICANCE else ""
    return f"{test['difference']:+.4f} [{low:+.4f}, {high:+.4f}]", p + mark
