"""All benchmarks in one run: `.venv/bin/python -m benchmarks` (about 10 minutes on 2 CPU cores).

Writes results/bench/{machine,training_cost,inference,orchestration}.json and
results/bench/summary.md (each measure against its target, docs/benchmarks.md), every figure with the
machine it ran on.
Ratios are measured in this one run, so they compare like with like.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import inference, machine, orchestration, training_cost
from components.atomic import atomic_file
from pipeline.runtime import output_files

# (what, the target, how the measured figure is read)
TARGETS = {
    "explicit/hierarchical training FLOPs": ">= 3.9x (paper: about 4.2x)",
    "explicit/hierarchical minibatch time": ">= 1.9x (paper: 1.9x)",
    "explicit/hierarchical activation memory": ">= 2.5x (paper: roughly 4x)",
    "training FLOP/s over matmul FLOP/s, fp32": ">= 0.6",
    "Ray Train 1 worker over plain loop": "<= 1.10x",
    "loader samples/s over training consumption": ">= 5x",
    "batched inference over FLOPs prediction": "within 1.2x",
}


def summary(results: dict) -> str:
    cost, inf, orch = results["training_cost"], results["inference"], results["orchestration"]
    e_h = cost["explicit_over_hierarchical"]
    eff = cost["efficiency"]
    worst = max(inf["scale_sets"], key=lambda r: abs(r["measured_over_predicted"] - 1))
    per_round = [r["ray_over_plain_epoch"] for r in orch["rounds"]]
    controls = [r["plain_after_over_before_epoch"] for r in orch["rounds"]]
    ray_range = (f"{min(per_round):.2f}-{max(per_round):.2f}x; plain loop against itself "
                 f"{min(controls):.2f}-{max(controls):.2f}x")
    lines = [
        f"Machine: {machine.one_line(results['machine'])}.",
        f"Model: {cost['model']['trunk']} OS{cost['model']['output_stride']} {cost['model']['decoder']}, "
        f"crop {cost['crop'][0]}x{cost['crop'][1]}, batch {cost['batch']}.",
        "",
        "| method | train scales | train GFLOPs/minibatch | vs single | minibatch s (median) | vs single "
        "| training RSS MB | activations MB | vs single |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in cost["methods"]:
        lines.append(
            f"| {r['method']} | {r['train_scales']} | {r['train_gflops']:.1f} | {r['train_gflops_vs_single']:.2f}x "
            f"| {r['median_s']:.3f} | {r['median_s_vs_single']:.2f}x | {r['training_rss_mb']:.0f} "
            f"| {r['activation_mb']:.0f} | {r['activation_mb_vs_single']:.2f}x |"
        )
    measured = {
        "explicit/hierarchical training FLOPs": f"{e_h.get('train_gflops', float('nan')):.2f}x",
        "explicit/hierarchical minibatch time": f"{e_h.get('median_s', float('nan')):.2f}x",
        "explicit/hierarchical activation memory": f"{e_h.get('activation_mb', float('nan')):.2f}x "
        f"(training RSS {e_h.get('training_rss_mb', float('nan')):.2f}x)",
        "training FLOP/s over matmul FLOP/s, fp32": f"{eff['fp32']['fraction_of_matmul']:.2f} "
        f"({eff['fp32']['train_gflops_per_s']:.0f} of "
        f"{eff['fp32']['matmul_gflops_per_s']:.0f} GFLOP/s)",
        "Ray Train 1 worker over plain loop": f"{orch['ray_over_plain_epoch']:.2f}x per epoch (median of "
        f"{len(orch['rounds'])} rounds, {ray_range}), "
        f"{orch['ray_over_plain_epoch_wall']:.2f}x with its report, "
        f"{orch['ray_over_plain_wall']:.2f}x wall with worker start",
        "loader samples/s over training consumption": f"{cost['data_path']['ratio']:.1f}x "
        f"({cost['data_path']['loader_workers']} loader workers)",
        "batched inference over FLOPs prediction": (
            f"worst {worst['measured_over_predicted']:.2f}x at {worst['scales']}"
        ),
    }
    lines += ["", "| measure | target | measured |", "|---|---|---|"]
    lines += [f"| {name} | {TARGETS[name]} | {measured[name]} |" for name in TARGETS]
    if "bf16" in eff:
        lines.append(
            f"| training bf16 over fp32 speed | faster where the hardware has bf16 | "
            f"{eff['bf16_speedup']:.2f}x ({eff['bf16']['fraction_of_matmul']:.2f} of bf16 matmul) |"
        )
    compiled = eff.get("compile", {})
    if "speedup" in compiled:
        pays = f"pays after {compiled['break_even_steps']:.0f} steps" if compiled["break_even_steps"] else "never pays"
        lines.append(
            f"| torch.compile of the training step ({compiled['precision']}) | where it pays | "
            f"{compiled['speedup']:.2f}x per step, {compiled['compile_s']:.0f} s to compile, {pays} |"
        )
    lines.append(
        f"| cores the training used over steady epochs (plain loop, under Ray; Ray's own processes) "
        f"| (reported) | {orch['plain_training_cores']:.2f}, {orch['ray_training_cores']:.2f}; "
        f"{orch['ray_other_cores']:.3f} |"
    )
    lines.append(
        f"| two Ray Train workers over one (same global batch, same CPUs) | (reported) | "
        f"{orch['two_over_one_workers_speedup']:.2f}x |"
    )
    lines.append(
        f"| evaluation of all evaluate.scale_sets at once over one set after another | (reported) | "
        f"{inf['all_sets']['ratio']:.2f}x ({inf['all_sets']['ms_per_image']:.0f} against "
        f"{inf['all_sets']['one_after_another_ms_per_image']:.0f} ms/image) |"
    )
    lines.append(
        f"| pyfunc model over direct call, {inf['pyfunc']['scales']} | (reported) | "
        f"{inf['pyfunc']['ratio']:.2f}x ({inf['pyfunc']['ms_per_image']:.0f} ms/image) |"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--output", default="results/bench")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per method")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the orchestration comparison")
    args = parser.parse_args()
    results = {"machine": machine.describe()}
    print(f"machine: {machine.one_line(results['machine'])}")
    print("training cost:")
    results["training_cost"] = training_cost.run(args.params, args.steps)
    print("inference:")
    results["inference"] = inference.run(args.params, args.steps)
    print("orchestration:")
    results["orchestration"] = orchestration.run(args.params, args.epochs, images=24)
    out = Path(args.output)
    for name, value in results.items():
        with atomic_file(out / f"{name}.json", output_files.BENCHMARK_RESULT) as handle:
            json.dump(value, handle, indent=2)
    text = summary(results)
    with atomic_file(out / "summary.md", output_files.MARKDOWN_SUMMARY) as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
