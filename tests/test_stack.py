"""`infra/local/stack.py start --services-only`: S3 and MLflow for use beside a Ray cluster of the
user's own, with no Ray of the stack's (two Rays on one machine make Ray's own tools fail to choose)."""

import json
import socket
import subprocess
import sys
import urllib.request

import pytest

from benchmarks import process_cpu
from tests.dvc_helpers import ROOT
from tests.services import python_env

pytestmark = pytest.mark.integration
STACK = str(ROOT / "infra" / "local" / "stack.py")
# MLflow's job runner and its consumers, as a process list shows them (pipeline/runtime/mlflow_server.py)
JOB_PROCESS_MARKERS = ("mlflow.server.jobs", "huey_consumer")


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_services_only_starts_s3_and_mlflow_and_no_ray(tmp_path):
    import boto3

    state = tmp_path / "stack"
    done = subprocess.run([sys.executable, STACK, "start", "--services-only", "--free-ports", "--json",
                           "--state", str(state)], capture_output=True, text=True, timeout=300, env=python_env())
    try:
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        variables = json.loads(done.stdout.strip().splitlines()[-1])
        assert not any(name.startswith("RAY_") for name in variables), variables  # the user's own Ray stays theirs
        assert variables["HMSA_STORAGE"] == "s3://hmsa/pipeline"
        assert not (state / "ray-head.pid").exists() and not list(state.glob("ray-node-*.pid"))
        ports = json.loads((state / "stack.json").read_text())["ports"]
        assert not listening(ports["ray"]) and not listening(ports["dashboard"])  # nothing of Ray's came up
        assert listening(ports["s3"]) and listening(ports["mlflow"])
        with urllib.request.urlopen(f"{variables['MLFLOW_TRACKING_URI']}/health", timeout=10) as answer:
            assert answer.status == 200
        # The server alone: none of MLflow's job runner and consumer processes, which the pipeline
        # never uses (pipeline/runtime/mlflow_server.py)
        snap = process_cpu.snapshot()
        server_tree = process_cpu.descendants(snap, int((state / "mlflow.pid").read_text()))
        assert not [snap.command_lines[pid] for pid in server_tree
                    if any(marker in snap.command_lines[pid] for marker in JOB_PROCESS_MARKERS)]
        client = boto3.session.Session().client(
            "s3", endpoint_url=variables["AWS_ENDPOINT_URL"], region_name="us-east-1",
            aws_access_key_id=variables["AWS_ACCESS_KEY_ID"], aws_secret_access_key=variables["AWS_SECRET_ACCESS_KEY"])
        client.put_object(Bucket="hmsa", Key="probe", Body=b"x")  # the bucket exists, the credentials work
        # `env` prints the same variables; node commands say there are no nodes
        env = subprocess.run([sys.executable, STACK, "env", "--json", "--state", str(state)], capture_output=True,
                             text=True, timeout=60, env=python_env())
        assert json.loads(env.stdout.strip().splitlines()[-1]) == variables
        node = subprocess.run([sys.executable, STACK, "stop-node", "1", "--state", str(state)], capture_output=True,
                              text=True, timeout=60, env=python_env())
        assert node.returncode != 0 and "no stack with Ray nodes is running" in node.stderr
    finally:
        subprocess.run([sys.executable, STACK, "stop", "--state", str(state)], capture_output=True, timeout=120)
    assert not (state / "stack.json").exists() and not (state / "mlflow.pid").exists()
