"""Services that go away mid-run, with real processes: the MLflow tracking server and the S3
endpoint stopped during training and started again. Training completes, or fails with one clear
line and a rerun finishes; either way there is one MLflow run with every epoch once, one logged
model, and the checkpoints written before the outage are still there."""

from __future__ import annotations

import subprocess
import time

import mlflow
import pytest

from tests.services import MlflowServer, RayHead, SeaweedS3, wait_until
from tests.train_helpers import run_on_cluster, stage_command, stage_env, tiny_pyramid, write_params

pytestmark = pytest.mark.integration

RAY_HEAD_CPUS = 2
EPOCHS = 8  # long enough that the outage falls inside the training


def epochs_logged(server: MlflowServer) -> list[int]:
    client = mlflow.MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("hmsa")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return [m.step for run in runs for m in client.get_metric_history(run.info.run_id, "val_miou")]


def assert_one_complete_run(server: MlflowServer) -> None:
    client = mlflow.MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("hmsa")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # never a second, half-made run
    assert runs[0].info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val_miou"))
    assert set(steps) == set(range(1, EPOCHS + 1)), steps
    assert len(client.search_logged_models(experiment_ids=[experiment.experiment_id])) == 1


def start_training(tmp_path, ray_head, **env):
    data = tiny_pyramid(tmp_path / "data", train_images=16)
    params = write_params(tmp_path, data, train={"epochs": EPOCHS})
    full_env = stage_env(params, **ray_head.client_env(), **env)
    proc = subprocess.Popen(stage_command("train", params), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=full_env)
    return params, full_env, proc


@pytest.mark.timeout(900)
def test_tracking_server_down_during_training(tmp_path, ray_head):
    (tmp_path / "mlflow").mkdir()
    server = MlflowServer(tmp_path / "mlflow")
    try:
        _, _, proc = start_training(tmp_path, ray_head, MLFLOW_TRACKING_URI=server.uri)
        wait_until(lambda: 1 in epochs_logged(server), 300, "the first epoch in MLflow", proc)
        server.stop()
        assert proc.poll() is None, "the training ended before the outage began"
        time.sleep(8)  # an epoch or two of logging meets a closed port; the client retries
        server.start()
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-3000:]
        assert_one_complete_run(server)
    finally:
        server.stop()


@pytest.mark.timeout(1200)
def test_s3_endpoint_down_during_checkpoint_uploads(tmp_path):
    started = []  # every service this test starts, stopped at the end whatever happens
    try:
        s3 = SeaweedS3(tmp_path / "s3")
        started.append(s3)
        (tmp_path / "mlflow").mkdir()
        server = MlflowServer(tmp_path / "mlflow")
        started.append(server)
        ray_head = RayHead(num_cpus=2, **s3.env())  # the node's own S3 credentials
        started.append(ray_head)
        s3.client().create_bucket(Bucket="runs")
        params, env, proc = start_training(tmp_path, ray_head, **s3.env(), AWS_ENDPOINT_URL=s3.endpoint,
                                           HMSA_STORAGE="s3://runs/hmsa", MLFLOW_TRACKING_URI=server.uri)
        wait_until(lambda: 1 in epochs_logged(server), 300, "the first epoch in MLflow", proc)
        before = {o["Key"] for o in s3.client().list_objects_v2(Bucket="runs").get("Contents", [])}
        s3.stop()
        assert proc.poll() is None, "the training ended before the outage began"
        time.sleep(8)
        s3.start()
        output, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:  # failed: clearly, and the rerun finishes from the last checkpoint
            # One line of ours (Ray's forwarded worker logs may follow it, each prefixed with its actor).
            lines = output.splitlines()
            assert any(line.startswith("error: HMSA_STORAGE = s3://runs/hmsa/ray: training stopped because the "
                                       "storage failed") for line in lines), output[-3000:]
            assert "Traceback (most recent call last):" not in lines, output[-3000:]  # none of the driver's
            done = run_on_cluster(stage_command("train", params), env, 600, ray_head)
            assert done.returncode == 0, done.stderr[-3000:]
        after = {o["Key"] for o in s3.client().list_objects_v2(Bucket="runs").get("Contents", [])}
        assert any("checkpoint_" in key for key in after)
        assert not [k for k in before if "checkpoint_manager_snapshot" in k and k not in after]
        assert_one_complete_run(server)
    finally:
        for service in reversed(started):
            service.stop()
