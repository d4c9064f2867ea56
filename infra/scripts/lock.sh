#!/usr/bin/env bash
# Recompile requirements.lock from requirements.in with uv's resolver (seconds, where pip's
# backtracking takes many minutes over this stack). The CPU torch wheel comes from /opt/wheels
# when present; on a machine without it, drop the "+cpu" local tag in requirements.in.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv /tmp/uv-venv && /tmp/uv-venv/bin/pip install -q uv
/tmp/uv-venv/bin/uv pip compile requirements.in --python-version 3.11 \
  --python-platform x86_64-manylinux_2_28 --find-links /opt/wheels \
  --index-strategy unsafe-best-match -o requirements.lock
