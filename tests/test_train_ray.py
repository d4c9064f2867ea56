"""The train stage on a real local Ray cluster: DDP, fault tolerance, resume, MLflow, bad config."""

import json
import os
import signal
import subprocess
import time

import mlflow
import pytest

from components.models import load_saved_model
from tests.services import MlflowServer, python_env, wait_until
from tests.train_helpers import curve_epochs, read_metrics, run_stage, stage_command, tiny_pyramid, write_params

pytestmark = pytest.mark.integration


RAY_HEAD_CPUS = 3  # for the ray_head fixture of conftest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_pyramid(tmp_path_factory.mktemp("data"), train_images=12)


def registered_epochs(workdir) -> list[int]:
    """Epochs of the checkpoints Ray Train has registered (a checkpoint directory can exist on
    disk before the controller registers it; only registered ones are restored)."""
    for snapshot in (workdir / "ray_results").glob("*/checkpoint_manager_snapshot.json"):
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (json.JSONDecodeError, KeyError):
            return []  # being rewritten
        return sorted(r["metrics"]["epoch"] for r in results)
    return []


def test_two_workers_ddp_replicas_agree(tmp_path, data, ray_head):
    params = write_params(tmp_path, data, ray={"num_workers": 2}, train={"epochs": 2})
    done = run_stage("train", params, **ray_head.client_env())
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_metrics(tmp_path)
    assert metrics["num_workers"] == 2 and metrics["epochs"] == 2
    # The SHA-256 of every parameter matched across both ranks after every epoch.
    assert metrics["replicas_in_sync"] is True
    model, cfg = load_saved_model(tmp_path / "model")
    assert cfg.method == "hierarchical"


def _start_training(tmp_path, data, ray_head, epochs, **sections):
    params = write_params(tmp_path, data, train={"epochs": epochs, "crop_size": [96, 96], "batch_size": 2},
                          model={"trunk": "resnet18", "decoder_channels": 32, "attention_channels": 32},
                          **sections)
    proc = subprocess.Popen(stage_command("train", params), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=python_env(**ray_head.client_env()))
    wait_until(lambda: len(registered_epochs(tmp_path)) >= 1, 240, "a first registered checkpoint", proc)
    return params, proc


def training_worker_pids() -> list[int]:
    """PIDs of live Ray Train workers: Ray titles each actor process after its class."""
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]


def test_worker_killed_mid_training_recovers_from_checkpoint(tmp_path, data, ray_head):
    params, proc = _start_training(tmp_path, data, ray_head, epochs=6, ray={"max_failures": 2})
    pids = training_worker_pids()
    assert pids, "no live training worker to kill"
    os.kill(pids[0], signal.SIGKILL)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    metrics = read_metrics(tmp_path)
    # Restarted once from a checkpoint after epoch k >= 1, and every epoch appears exactly once.
    assert len(metrics["resumed_at_epochs"]) == 1 and 1 <= metrics["resumed_at_epochs"][0] < 6
    assert curve_epochs(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_driver_killed_then_stage_rerun_resumes_in_one_mlflow_run(tmp_path, data, ray_head):
    server = MlflowServer(tmp_path)
    try:
        params, proc = _start_training(tmp_path, data, ray_head, epochs=5, mlflow={"tracking_uri": server.uri})
        proc.send_signal(signal.SIGKILL)  # the driver dies; its Ray actors go with it
        proc.wait()
        first = max(registered_epochs(tmp_path))
        done = run_stage("train", params, **ray_head.client_env())
        assert done.returncode == 0, done.stderr[-3000:]
        metrics = read_metrics(tmp_path)
        resumed_at = metrics["resumed_at_epochs"]
        assert len(resumed_at) == 1 and resumed_at[0] >= first >= 1  # the second run trained 5 - k epochs
        assert curve_epochs(tmp_path) == [1, 2, 3, 4, 5]

        client = mlflow.MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("hmsa")
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 1  # the resumed training continued the same run
        run = runs[0]
        history = client.get_metric_history(run.info.run_id, "val_miou")
        assert sorted({m.step for m in history}) == [1, 2, 3, 4, 5]
        assert run.data.tags["method"] == "hierarchical" and run.data.tags["dataset_manifest"]
        assert run.data.params["model.trunk"] == "resnet18"
        models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
        assert len(models) == 1 and models[0].source_run_id == run.info.run_id
    finally:
        server.stop()


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"ray": {"num_workers": 8}}, "ray.num_workers = 8"),
        ({"ray": {"use_gpu": True}}, "ray.use_gpu = true, but the cluster has no GPU"),
        ({"ray": {"address": "127.0.0.1:1"}}, "ray.address = '127.0.0.1:1': no Ray cluster answers there"),
        ({"ray": {"storage_path": "/dev/null/checkpoints"}}, "ray.storage_path = '/dev/null/checkpoints'"),
    ],
)
def test_bad_cluster_configuration_fails_fast(tmp_path, data, ray_head, sections, message):
    params = write_params(tmp_path, data, **sections)
    start = time.time()
    env = ray_head.client_env()
    if "address" in sections.get("ray", {}):
        env["RAY_ADDRESS"] = ""
    done = run_stage("train", params, timeout=120, **env)
    assert done.returncode == 1 and message in done.stderr, done.stderr[-2000:]
    assert time.time() - start < 60
    assert not (tmp_path / "model").exists()
