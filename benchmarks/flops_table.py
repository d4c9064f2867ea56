"""Print the FLOPs table of the five methods (inference and one training step).

    .venv/bin/python -m benchmarks.flops_table [--trunk resnet50] [--decoder deeplabv3plus] [--size 512 1024]

Counted on the meta device (components.flops), so a ResNet-50 at 1024x2048 costs seconds.
"""

from __future__ import annotations

import argparse

from components.config import ModelConfig
from components.flops import inference_flops, train_step_flops

# Each method with its training scales and a representative inference scale set.
METHOD_SCALES = {
    "single": ([1.0], [1.0]),
    "avgpool": ([1.0], [0.5, 1.0, 2.0]),
    "maxpool": ([1.0], [0.5, 1.0, 2.0]),
    "explicit": ([0.5, 1.0, 2.0], [0.5, 1.0, 2.0]),
    "hierarchical": ([0.5, 1.0], [0.5, 1.0, 2.0]),
}


def flops_table(trunk: str, decoder: str, size: tuple[int, int]) -> list[dict]:
    rows = []
    for method, (train_scales, eval_scales) in METHOD_SCALES.items():
        cfg = ModelConfig(method=method, trunk=trunk, decoder=decoder, train_scales=train_scales)
        rows.append(
            {
                "method": method,
                "train_scales": train_scales,
                "eval_scales": eval_scales,
                "train_gflops": train_step_flops(cfg, size) / 1e9,
                "eval_gflops": inference_flops(cfg, eval_scales, size) / 1e9,
            }
        )
    single = rows[0]["train_gflops"]
    for row in rows:
        row["train_vs_single"] = row["train_gflops"] / single
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trunk", default="resnet50")
    parser.add_argument("--decoder", default="deeplabv3plus")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 1024))
    args = parser.parse_args()
    rows = flops_table(args.trunk, args.decoder, tuple(args.size))
    print(f"{args.decoder}/{args.trunk} at {args.size[0]}x{args.size[1]}, batch 1")
    print("| method | train scales | train GFLOPs (fwd+bwd) | vs single | eval scales | eval GFLOPs |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['train_scales']} | {r['train_gflops']:.0f} | {r['train_vs_single']:.2f}x "
            f"| {r['eval_scales']} | {r['eval_gflops']:.0f} |"
        )


if __name__ == "__main__":
    main()
