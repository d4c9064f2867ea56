"""The machine a figure was measured on: CPU model and flags that matter here, threads, GPU."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")
# Variables that cap the instruction sets of PyTorch's kernels and its math libraries: with all three
# at AVX2 a newer CPU computes as an AVX2-only one would (same clock, so a lower bound on its time).
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def describe() -> dict:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "cpu": model,
        "cpu_flags": [f for f in FLAGS_OF_INTEREST if f in flags],
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "kernels": torch.backends.cpu.get_cpu_capability(),
        "isa_caps": {name: os.environ[name] for name in ISA_CAPS if os.environ.get(name)},
    }


def one_line(machine: dict) -> str:
    gpu = machine["gpu"] or "no GPU"
    caps = machine.get("isa_caps") or {}
    capped = f", capped ({', '.join(f'{k}={v}' for k, v in caps.items())})" if caps else ""
    return (f"{machine['cpu']} ({machine['cpu_count']} cores, flags: {', '.join(machine['cpu_flags']) or 'none'}"
            f"{capped}), {gpu}, torch {machine['torch']}")
