"""Credentials never leave the process that was given them: train with recognisable fake secrets
in the environment (S3 keys) and inside the tracking URI (user:password@host of an MLflow server
with basic auth), then search everything written for them: the MLflow server's store and
artifacts, the stage's outputs, the checkpoints on S3, Ray's logs, stdout and stderr."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.services import MlflowServer, RayHead, SeaweedS3
from tests.train_helpers import run_on_cluster, stage_command, stage_env, tiny_pyramid, write_params

pytestmark = pytest.mark.integration

# Drawn per run, so that no file holds them by chance (this test's own source, shipped to the
# cluster with the code, would otherwise match).
S3_KEY_ID = "AKIA" + uuid.uuid4().hex[:16].upper()
S3_SECRET = "s3-secret-" + uuid.uuid4().hex
MLFLOW_PASSWORD = "mlflow-pw-" + uuid.uuid4().hex
SECRETS = (S3_KEY_ID, S3_SECRET, MLFLOW_PASSWORD)


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


@pytest.mark.timeout(900)
def test_no_secret_is_written_anywhere(tmp_path):
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
        data = tiny_pyramid(tmp_path / "data")
        params = write_params(tmp_path, data, train={"epochs": 1})
        env = stage_env(params, **cluster.client_env(), **s3.env(), AWS_ENDPOINT_URL=s3.endpoint,
                        HMSA_STORAGE="s3://runs/hmsa",
                        MLFLOW_TRACKING_URI=server.uri.replace("http://", f"http://admin:{MLFLOW_PASSWORD}@"))
        done = run_on_cluster(stage_command("train", params), env, 600, cluster)
        assert done.returncode == 0, done.stderr[-3000:]

        leaks = [f"stdout/stderr: {s}" for s in SECRETS if s in done.stdout + done.stderr]
        # The stage's outputs and the tracking server's store and artifacts (its auth config and
        # the S3 server's own key file hold the credentials by design: they are the services').
        services_own = {mlflow_dir / "basic_auth.ini", tmp_path / "s3" / "s3.json"}
        leaks += [f for f in files_holding(tmp_path) if Path(f.split(": ")[0]) not in services_own
                  and not f.startswith(str(tmp_path / "s3" / "data"))]
        # Everything on S3 (checkpoints, Ray Train's run state), object by object.
        client = s3.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket="runs"):
            for item in page.get("Contents", []):
                body = client.get_object(Bucket="runs", Key=item["Key"])["Body"].read()
                leaks += [f"s3://runs/{item['Key']}: {s}" for s in SECRETS if s.encode() in body]
        # Ray's session: logs of the driver, the workers, the runtime-env agent and the dashboard.
        leaks += files_holding(Path(cluster.workdir))
        assert not leaks, "\n".join(leaks[:20])
    finally:
        for service in reversed(started):
            service.stop()
