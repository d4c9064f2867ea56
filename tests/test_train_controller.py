"""Ray Train's controller polls its workers often enough that short epochs are not stretched.

The controller takes a worker's report when it polls (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s
by Ray's default) and a worker's next report waits until then: the ablation's 0.9 s epochs took
2.0 s. The pipeline sets a short interval for every process of its job, local or on a cluster."""

import json
import subprocess
import sys

import pytest

from pipeline.cluster import TRAIN_POLL_INTERVAL_S
from tests.services import RayHead, python_env

pytestmark = pytest.mark.integration

# Joins Ray as a stage does, then reads the variable in a Ray worker process of the job.
READ_IN_A_WORKER = """
import json, os, ray
from pipeline import cluster
from pipeline.environment import Environment
cluster.connect(Environment.from_environ())
seen = ray.get(ray.remote(num_cpus=0)(lambda: os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")).remote())
print(json.dumps(seen))
"""


def seen_by_a_worker(tmp_path, **env) -> str | None:
    done = subprocess.run([sys.executable, "-c", READ_IN_A_WORKER], capture_output=True, text=True, timeout=300,
                          env=python_env(HMSA_STORAGE=str(tmp_path / "store"), **env))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_local_ray_polls_train_workers_often(tmp_path):
    assert seen_by_a_worker(tmp_path, RAY_ADDRESS="") == TRAIN_POLL_INTERVAL_S


def test_a_joined_cluster_polls_train_workers_often_unless_the_user_says_otherwise(tmp_path):
    head = RayHead(num_cpus=1)
    try:
        assert seen_by_a_worker(tmp_path, **head.client_env()) == TRAIN_POLL_INTERVAL_S
        assert seen_by_a_worker(tmp_path, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="1.5", **head.client_env()) == "1.5"
    finally:
        head.stop()
