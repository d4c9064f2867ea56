"""use_gpu: auto on a cluster that starts empty and whose autoscaler can launch GPU nodes
(infra/local/stack.py --autoscale --fake-gpus-per-node). Its own module: it needs a stack of its
own, and `make test` can then run it beside tests/test_autoscaling.py instead of after it."""

import subprocess
import sys

import pytest

from tests.dvc_helpers import ROOT
from tests.services import local_stack

pytestmark = pytest.mark.integration


DECIDE_ON_GPUS = """
import os, ray
from components.config import RayConfig
from pipeline.runtime import capacity
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR")
use_gpu = capacity.provide(RayConfig(num_workers=1, cpus_per_worker=1, use_gpu="auto"), 120)
print("RESULT", use_gpu, ray.cluster_resources().get("GPU", 0))
"""


def test_auto_takes_the_gpu_nodes_the_autoscaler_launches(tmp_path):
    """use_gpu: auto on a cluster with no GPU up whose autoscaler can launch GPU nodes: GPU workers
    (the nodes declare GPUs they do not have: the decision is what is checked, nothing trains)."""
    with local_stack(tmp_path / "stack", "--autoscale", "--workers", "1", "--fake-gpus-per-node", "1") as gpu_stack:
        done = subprocess.run([sys.executable, "-c", DECIDE_ON_GPUS], capture_output=True, text=True, timeout=300,
                              env=gpu_stack.env, cwd=ROOT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "ray.use_gpu = auto: the autoscaler provided 1 worker(s) of 1 CPU + 1 GPU" in done.stdout, done.stdout
    assert "RESULT True 1.0" in done.stdout.splitlines()  # GPU workers, and the GPU node is up
