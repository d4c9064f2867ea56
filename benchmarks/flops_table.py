"""Print the FLOPs table of the five methods (inference and one training step), by default at the
paper's model size (ResNet-50 at output stride 8, DeepLabV3+ with 256-channel decoder and attention
heads, as infra/profiles/paper.yaml): the table docs/model.md shows, checked against this output by
tests/test_flops.py.

    .venv/bin/python -m benchmarks.flops_table [--trunk resnet50] [--output-stride 8] [--size 512 1024]

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


PAPER_MODEL = {"trunk": "resnet50", "output_stride": 8, "decoder": "deeplabv3plus", "decoder_channels": 256,
               "attention_channels": 256}


def flops_table(size: tuple[int, int], **model) -> list[dict]:
    rows = []
    for method, (train_scales, eval_scales) in METHOD_SCALES.items():
        cfg = ModelConfig(**{**PAPER_MODEL, **model}, method=method, train_scales=train_scales)
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


def table_lines(rows: list[dict]) -> list[str]:
    lines = ["| method | train scales | train GFLOPs (fwd+bwd) | vs single | eval scales | eval GFLOPs |",
             "|---|---|---|---|---|---|"]
    return lines + [f"| {r['method']} | {r['train_scales']} | {r['train_gflops']:.0f} | {r['train_vs_single']:.2f}x "
                    f"| {r['eval_scales']} | {r['eval_gflops']:.0f} |" for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trunk", default=PAPER_MODEL["trunk"])
    parser.add_argument("--output-stride", type=int, choices=(8, 16), default=PAPER_MODEL["output_stride"])
    parser.add_argument("--decoder", default=PAPER_MODEL["decoder"])
    parser.add_argument("--size", type=int, nargs=2, default=(512, 1024))
    args = parser.parse_args()
    rows = flops_table(tuple(args.size), trunk=args.trunk, output_stride=args.output_stride, decoder=args.decoder)
    print(f"{args.decoder}/{args.trunk} at output stride {args.output_stride}, {args.size[0]}x{args.size[1]}, batch 1")
    print("\n".join(table_lines(rows)))


if __name__ == "__main__":
    main()
