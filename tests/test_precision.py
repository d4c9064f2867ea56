"""`train.precision: auto` picks bf16 only where it runs natively, including under instruction-set caps.

An operator caps PyTorch's kernels (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA) to pin a fleet to its
oldest machines; under a cap below AVX512-BF16 a bf16 step takes about 35 times as long as fp32 here,
so `auto` must choose fp32 there as it does on a CPU without bf16.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from components.training import autocast_dtype, bf16_blocker

CPU = torch.device("cpu")
CPU_HAS_BF16 = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def auto_choice_in_subprocess(**variables: str) -> str:
    """What `auto` picks and why, in a fresh interpreter (ATen reads its cap once, at import)."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                           "DNNL_MAX_CPU_ISA")}
    code = ("import torch; from components.training import autocast_dtype, bf16_blocker; "
            "print(autocast_dtype('auto', torch.device('cpu')), '|', bf16_blocker())")
    done = subprocess.run([sys.executable, "-c", code], env={**env, **variables}, capture_output=True,
                          text=True, timeout=120, check=True)
    return done.stdout.strip()


@pytest.mark.parametrize("variable", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])
@pytest.mark.parametrize("isa", ["AVX2", "avx512_core"])
def test_a_onednn_cap_below_bf16_means_fp32(monkeypatch, variable, isa):
    monkeypatch.setenv(variable, isa)
    assert autocast_dtype("auto", CPU) is None
    if CPU_HAS_BF16:
        assert variable in bf16_blocker() and isa.upper() in bf16_blocker()


def test_an_aten_cap_below_avx512_means_fp32():
    chosen, why = auto_choice_in_subprocess(ATEN_CPU_CAPABILITY="avx2").split(" | ")
    assert chosen == "None"
    assert ("ATEN_CPU_CAPABILITY" in why) if CPU_HAS_BF16 else ("neither" in why)


def test_no_cap_follows_the_cpu(monkeypatch):
    for variable in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(variable, raising=False)
    expected = torch.bfloat16 if CPU_HAS_BF16 and torch.backends.cpu.get_cpu_capability() == "AVX512" else None
    assert autocast_dtype("auto", CPU) is expected
    # A cap at or above bf16 changes nothing.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert autocast_dtype("auto", CPU) is expected
    # Explicit choices are the user's, cap or not.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    assert autocast_dtype("fp32", CPU) is None
