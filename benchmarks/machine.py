"""The machine a figure was measured on: CPU model and flags that matter here, threads, GPU."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")


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
    }


def one_line(machine: dict) -> str:
    gpu = machine["gpu"] or "no GPU"
    return (f"{machine['cpu']} ({machine['cpu_count']} cores, flags: {', '.join(machine['cpu_flags']) or 'none'}), "
            f"{gpu}, torch {machine['torch']}")
