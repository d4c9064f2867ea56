"""Multi-node: a two-node Ray cluster (ray.cluster_utils.Cluster), one training worker per node."""

import pytest

from components.models import load_saved_model
from tests.train_helpers import read_metrics, run_stage, tiny_pyramid, write_params

pytestmark = pytest.mark.integration


def test_one_worker_per_node(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    data = tiny_pyramid(tmp_path / "data")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    cluster.add_node(num_cpus=1, num_gpus=0)
    try:
        cluster.wait_for_nodes()
        # STRICT_SPREAD puts the two workers on different nodes (and cannot be placed otherwise).
        params = write_params(tmp_path, data, ray={"num_workers": 2, "placement_strategy": "STRICT_SPREAD"},
                              train={"epochs": 2})
        done = run_stage("train", params, RAY_ADDRESS=cluster.address)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        cluster.shutdown()
    metrics = read_metrics(tmp_path)
    assert metrics["num_workers"] == 2 and metrics["replicas_in_sync"] is True
    checkpoints = sorted(p for p in (tmp_path / "ray_results").glob("*/checkpoint_*") if p.is_dir())
    assert checkpoints, "no checkpoint written"
    model, cfg = load_saved_model(checkpoints[-1])  # a checkpoint is itself a readable saved model
    assert cfg.trunk == "tiny"
    load_saved_model(tmp_path / "model")
