"""Services that go away mid-run, and credentials that never leave the process given them, in one
training against real processes: an S3 server and an MLflow server (basic auth) with recognisable
fake credentials, and a Ray head whose node holds its own.

The MLflow tracking server is stopped for 8 s during training and started again: the client's
retries carry the training through. Then the S3 endpoint is stopped for 8 s during checkpoint
uploads: training completes, or fails with one clear line and a rerun finishes. Either way there is
one MLflow run with every epoch once, one logged model, and the checkpoints written before the
outage are still there. Then everything written is searched for the credentials: the MLflow
server's store and artifacts, the stage's outputs, the checkpoints on S3, Ray's logs, stdout and
stderr (the outages' retries and errors included)."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import mlflow
import pytest

from tests.services import MlflowServer, RayHead, SeaweedS3, wait_until
from tests.train_helpers import run_on_cluster, stage_command, stage_env, tiny_pyramid, write_params

pytestmark = pytest.mark.integration

EPOCHS = 10  # long enough that both outages fall inside the training

# Drawn per run, so that no file holds them by chance (this test's own source, shipped to the
# cluster with the code, would otherwise match).
S3_KEY_ID = "AKIA" + uuid.uuid4().hex[:16].upper()
S3_SECRET = "s3-secret-" + uuid.uuid4().hex
MLFLOW_PASSWORD = "mlflow-pw-" + uuid.uuid4().hex
SECRETS = (S3_KEY_ID, S3_SECRET, MLFLOW_PASSWORD)


def tracking_client(server: MlflowServer) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(server.uri.replace("http://", f"http://admin:{MLFLOW_PASSWORD}@"))


def epochs_logged(server: MlflowServer) -> list[int]:
    client = tracking_client(server)
    experiment = client.get_experiment_by_name("hmsa")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return [m.step for run in runs for m in client.get_metric_history(run.info.run_id, "val_miou")]


def assert_one_complete_run(server: MlflowServer) -> None:
    client = tracking_client(server)
    experiment = client.get_experiment_by_name("hmsa")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # never a second, half-made run
    assert runs[0].info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val_miou"))
    assert set(steps) == set(range(1, EPOCHS + 1)), steps
    assert len(client.search_logged_models(experiment_ids=[experiment.experiment_id])) == 1


def files_holding(root: Path, secrets=SECRETS) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue  # a socket or a file removed while we looked
            found += [f"{path}: {secret}" for secret in secrets if secret.encode() in data]
    return found


def checkpoint_keys(s3: SeaweedS3) -> set[str]:
    return {o["Key"] for o in s3.client().list_objects_v2(Bucket="runs").get("Contents", [])}


def objects_holding_secrets(s3: SeaweedS3) -> list[str]:
    client, found = s3.client(), []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="runs"):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket="runs", Key=item["Key"])["Body"].read()
            found += [f"s3://runs/{item['Key']}: {s}" for s in SECRETS if s.encode() in body]
    return found


@pytest.mark.timeout(1200)
def test_tracking_and_s3_outages_mid_training_lose_nothing_and_no_secret_is_written(tmp_path):
    started = []  # every service this test starts, stopped at the end whatever happens
    try:
        s3 = SeaweedS3(tmp_path / "s3", access_key=S3_KEY_ID, secret_key=S3_SECRET)
        started.append(s3)
        mlflow_dir = tmp_path / "mlflow"
        mlflow_dir.mkdir()
        server = MlflowServer(mlflow_dir, admin_password=MLFLOW_PASSWORD)
        started.append(server)
        # A cluster whose node holds its own credentials, as a pod gets them from a Secret.
        cluster = RayHead(num_cpus=2, **s3.env(), MLFLOW_TRACKING_USERNAME="admin",
                          MLFLOW_TRACKING_PASSWORD=MLFLOW_PASSWORD)
        started.append(cluster)
        s3.client().create_bucket(Bucket="runs")
        data = tiny_pyramid(tmp_path / "data", train_images=16)
        params = write_params(tmp_path, data, train={"epochs": EPOCHS})
        env = stage_env(params, **cluster.client_env(), **s3.env(), AWS_ENDPOINT_URL=s3.endpoint,
                        HMSA_STORAGE="s3://runs/hmsa",
                        MLFLOW_TRACKING_URI=server.uri.replace("http://", f"http://admin:{MLFLOW_PASSWORD}@"))
        proc = subprocess.Popen(stage_command("train", params), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)

        # The tracking server goes away after the first epoch is logged, and comes back.
        wait_until(lambda: 1 in epochs_logged(server), 300, "the first epoch in MLflow", proc)
        server.stop()
        assert proc.poll() is None, "the training ended before the tracking outage began"
        time.sleep(8)  # an epoch or two of logging meets a closed port; the client retries
        server.start()
        # The S3 endpoint goes away once the training has logged again, and comes back.
        logged = max(epochs_logged(server))
        wait_until(lambda: max(epochs_logged(server)) > logged, 300, "an epoch logged after the tracking outage",
                   proc)
        before = checkpoint_keys(s3)
        s3.stop()
        assert proc.poll() is None, "the training ended before the S3 outage began"
        time.sleep(8)
        s3.start()
        output, _ = proc.communicate(timeout=600)
        outputs = [output]
        if proc.returncode != 0:  # failed: clearly, and the rerun finishes from the last checkpoint
            # One line of ours (Ray's forwarded worker logs may follow it, each prefixed with its actor).
            lines = output.splitlines()
            assert any(line.startswith("error: HMSA_STORAGE = s3://runs/hmsa/ray: training stopped because the "
                                       "storage failed") for line in lines), output[-3000:]
            assert "Traceback (most recent call last):" not in lines, output[-3000:]  # none of the driver's
            done = run_on_cluster(stage_command("train", params), env, 600, cluster)
            assert done.returncode == 0, done.stderr[-3000:]
            outputs += [done.stdout, done.stderr]
        after = checkpoint_keys(s3)
        assert any("checkpoint_" in key for key in after)
        assert not [k for k in before if "checkpoint_manager_snapshot" in k and k not in after]
        assert_one_complete_run(server)

        # No credential in what was printed, retries and errors of the outages included ...
        leaks = [f"stdout/stderr: {s}" for s in SECRETS if any(s in text for text in outputs)]
        # ... in the stage's outputs and the tracking server's store and artifacts (its auth config
        # and the S3 server's own key file hold the credentials by design: they are the services') ...
        services_own = {mlflow_dir / "basic_auth.ini", tmp_path / "s3" / "s3.json"}
        leaks += [f for f in files_holding(tmp_path) if Path(f.split(": ")[0]) not in services_own
                  and not f.startswith(str(tmp_path / "s3" / "data"))]
        # ... in anything on S3 (checkpoints, Ray Train's run state), object by object, and in Ray's
        # session: logs of the driver, the workers, the runtime-env agent and the dashboard.
        leaks += objects_holding_secrets(s3)
        leaks += files_holding(Path(cluster.workdir))
        assert not leaks, "\n".join(leaks[:20])
    finally:
        for service in reversed(started):
            service.stop()
