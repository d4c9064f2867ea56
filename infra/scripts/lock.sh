#!/usr/bin/env bash
# Recompile both locks with uv's resolver (seconds, where pip's backtracking takes many minutes
# over this stack), for Linux x86_64 and Python 3.11:
#   requirements.lock      CPU target (torch==2.13.0+cpu, whose wheel this resolves from /opt/wheels;
#                          elsewhere add --extra-index-url https://download.pytorch.org/whl/cpu)
#   requirements-gpu.lock  GPU target (CUDA torch from PyPI and its nvidia-*/triton libraries),
#                          constrained to the CPU lock's versions for every shared package
# and infra/locks/gpu-requires.json: what the CUDA torch wheel requires, which tests/test_infra.py
# checks against the GPU lock.
set -euo pipefail
cd "$(dirname "$0")/../.."
test -x /tmp/uv-venv/bin/uv || { python3 -m venv /tmp/uv-venv && /tmp/uv-venv/bin/pip install -q uv; }
uv=/tmp/uv-venv/bin/uv
target=(--python-version 3.11 --python-platform x86_64-manylinux_2_28)

$uv pip compile requirements-cpu.in "${target[@]}" --find-links /opt/wheels \
  --index-strategy unsafe-best-match --no-header -o requirements.lock
grep -v '^torch==' requirements.lock | grep '==' > /tmp/hmsa-cpu-constraints.txt
$uv pip compile requirements-gpu.in "${target[@]}" -c /tmp/hmsa-cpu-constraints.txt \
  --no-header -o requirements-gpu.lock
mkdir -p infra/locks
python3 infra/scripts/wheel_requires.py requirements-gpu.lock torch > infra/locks/gpu-requires.json
