"""On a cluster that starts empty and autoscales, as KubeRay's does: infra/local/stack.py --autoscale
starts the services and a Ray head alone, and Ray's own autoscaler (its fake multi-node provider)
launches worker nodes of one CPU when work asks for them, in a mount namespace where the repository
and /tmp are empty. The waiting rules themselves are in tests/test_capacity.py, GPU nodes that the
autoscaler launches in tests/test_autoscaling_gpu.py."""

import json
import subprocess
from pathlib import Path

import mlflow
import pytest

from components.data.pyramid import content_hash
from tests.dvc_helpers import dvc, tiny_repo
from tests.services import local_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with local_stack(tmp_path_factory.mktemp("stack"), "--autoscale", "--workers", "2") as started:
        yield started


def bucket_keys(stack, prefix: str) -> list[str]:
    import boto3

    v = stack.variables
    client = boto3.session.Session().client("s3", endpoint_url=v["AWS_ENDPOINT_URL"], region_name="us-east-1",
                                            aws_access_key_id=v["AWS_ACCESS_KEY_ID"],
                                            aws_secret_access_key=v["AWS_SECRET_ACCESS_KEY"])
    keys, token = [], {}
    while True:
        page = client.list_objects_v2(Bucket="hmsa", Prefix=prefix, **token)
        keys += [item["Key"] for item in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = {"ContinuationToken": page["NextContinuationToken"]}


def file_hashes(root: Path) -> dict[str, str]:
    import hashlib

    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo, check=True)


@pytest.mark.timeout(1800)
def test_an_experiment_on_an_empty_autoscaling_cluster_reaches_a_teammates_clone(tmp_path, stack):
    """At Cityscapes' size (2048x1024 images, 256x256 crops): `dvc exp run` of prepare -> pyramid ->
    tune -> train -> evaluate -> register on a cluster that starts with its head alone; Ray's
    autoscaler launches the worker nodes the stages ask for (the data stages' tasks first), in a
    mount namespace without the driver's files, and the pyramid is read from S3 in tiles; then the
    README's flow for a teammate: `dvc exp push`, and in a fresh clone `dvc exp pull`, `dvc exp
    branch` and `dvc pull --allow-missing` give the same pyramid and model."""
    repo = tiny_repo(tmp_path / "repo", ray={"num_workers": 2, "cpus_per_worker": 1,
                                              "placement_strategy": "STRICT_SPREAD"},
                     prepare={"synthetic": {"train_images": 4, "val_images": 2, "height": 1024, "width": 2048},
                              "workers": 1},
                     train={"crop_size": [256, 256]},
                     # Scale sets up to 1.0: a 2.0 pass at this size is a 4096x2048 forward, four
                     # times the work of the 1.0 pass, through the same code as the 64x96 sets of
                     # tests/test_e2e_dvc.py; the scales are what these stages compute, not where.
                     evaluate={"scale_sets": [[1.0], [0.5, 1.0]]},
                     eval_scales={"scale_sets": {"s10": [1.0], "s05_10": [0.5, 1.0]}},
                     # one data task at a time: the autoscaler adds one node for prepare and pyramid,
                     # and the training's launch must still ask it for the second (what this test holds)
                     pyramid={"workers": 1})
    # The DVC remote needs no endpoint of its own: AWS_ENDPOINT_URL reaches it like every client.
    dvc(repo, "remote", "add", "-d", "storage", "s3://hmsa/dvc", env=stack.env)
    origin = tmp_path / "origin.git"  # the team's Git server
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "tiny")
    git(repo, "remote", "add", "origin", str(origin))
    git(repo, "push", "-q", "origin", "HEAD")

    done = dvc(repo, "exp", "run", "-n", "on-cluster", "register", env=stack.env)
    output = done.stdout + done.stderr
    # No worker node at first: the autoscaler was asked, and launched them (no GPU node type: auto
    # gives CPUs). Training ran on two of them.
    assert "the autoscaler provided 2 worker(s) of 1 CPU in " in output, output[-4000:]
    assert "ray.use_gpu = auto: no GPU workers: the cluster has none" in output
    assert "pre-flight passed on 3 node(s)" in output
    # The samples were converted and the pyramid's tiles cut by Ray tasks on a launched node, which
    # cannot open the driver's files: each task was sent its files' bytes.
    assert "prepare: converting samples as Ray tasks on the Ray cluster at" in output
    assert "(converted on 1 Ray node(s))" in output, output[-4000:]
    assert "pyramid: cutting tiles as Ray tasks on the Ray cluster at" in output
    assert "(tiles cut on 1 Ray node(s))" in output, output[-4000:]
    metrics = json.loads((repo / "results/train/metrics.json").read_text())
    assert metrics["num_workers"] == 2 and len(metrics["worker_nodes"]) == 2  # one worker on each node
    manifest = json.loads((repo / "data/pyramid/synthetic/manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["splits"]["val"][0]["width"] == 2048

    # Workers read the pyramid from the bucket, under its content hash; checkpoints and MLflow
    # artifacts are in the bucket too.
    digest = content_hash(repo / "data/pyramid/synthetic")
    assert f"s3://hmsa/pipeline/pyramids/{digest}" in output
    assert f"pipeline/pyramids/{digest}/manifest.json" in bucket_keys(stack, "pipeline/pyramids/")
    assert any("/checkpoint_" in key for key in bucket_keys(stack, "pipeline/ray/train-"))
    assert any(key.endswith("weights.safetensors") for key in bucket_keys(stack, "mlartifacts/"))
    record = json.loads((repo / "results/train/run.json").read_text())
    run = mlflow.MlflowClient(stack.variables["MLFLOW_TRACKING_URI"]).get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert json.loads((repo / "results/register/registration.json").read_text())["aliases"]["champion"]

    # The README's flow: the experiment's commit to Git, its outputs to the DVC remote ...
    dvc(repo, "exp", "push", "origin", "on-cluster", env=stack.env)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True)
    # ... and a teammate's clone takes both. A branch, not `dvc exp apply`: apply exits non-zero on
    # the outputs of stages the experiment did not run (the ablation's). --allow-missing for the same.
    dvc(clone, "exp", "pull", "origin", "on-cluster", env=stack.env)
    dvc(clone, "exp", "branch", "on-cluster", "from-on-cluster", env=stack.env)
    git(clone, "checkout", "-q", "from-on-cluster")
    dvc(clone, "pull", "--allow-missing", env=stack.env)
    for path in ("data/pyramid/synthetic", "models/hmsa"):
        assert file_hashes(clone / path) == file_hashes(repo / path), path
    assert (clone / "results/register/registration.json").read_text() == (
        repo / "results/register/registration.json").read_text()
