import os
import tempfile

# Two test processes, and the stages and Ray workers they start, share the machine's cores. OpenMP
# threads (torch's) that spin while they wait for work take CPU time from the other processes'
# work: on 2 cores the unit tier took 15-25% more CPU time spinning than sleeping. Set before torch
# loads OpenMP; every process the tests start inherits it. A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

# Hypothesis keeps its files (example database, caches) here, not in the checkout: tests write
# nothing into the repository.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", tempfile.mkdtemp(prefix="hmsa-hypothesis-"))

from components.config import ModelConfig

# The longest modules first: `make test` runs whole modules in two pytest-xdist processes, and a long
# module started last would run alone at the end. (Ordered by their durations in one `make test` on
# 2 cores; a module not listed runs after these. The Makefile turns off xdist's own reordering.)
LONGEST_FIRST = ["test_e2e_dvc.py", "test_kills.py", "test_train_ray.py", "test_autoscaling.py", "test_cluster.py",
                 "test_tune.py", "test_service_faults.py", "test_leaked_resources.py", "test_faults.py",
                 "test_register_predict.py", "test_train_controller.py", "test_autoscaling_gpu.py", "test_predict.py",
                 "test_evaluate.py", "test_stack.py", "test_data_bad_input.py", "test_environment.py"]


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module keeps its own order


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def tiny_model_config(**overrides) -> ModelConfig:
    """A model small enough for 64x64 CPU tests: tiny trunk, 32-channel decoder and heads."""
    values = {
        "trunk": "tiny",
        "decoder": "deeplabv3plus",
        "decoder_channels": 32,
        "attention_channels": 32,
        "num_classes": 5,
    }
    values.update(overrides)
    if "train_scales" not in overrides:
        method = values.get("method", "hierarchical")
        values["train_scales"] = [1.0] if method in ("single", "avgpool", "maxpool") else [0.5, 1.0]
    return ModelConfig(**values)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS) with credential checks, for the whole session."""
    from tests.services import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ray_head(request):
    """A `ray start --head` cluster for one test module; the module may set RAY_HEAD_CPUS."""
    from tests.services import RayHead

    head = RayHead(num_cpus=getattr(request.module, "RAY_HEAD_CPUS", 2))
    yield head
    head.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` process for one test module."""
    from tests.services import MlflowServer

    srv = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield srv
    srv.stop()


@pytest.fixture
def no_leaked_tracking_uri(monkeypatch):
    """mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; undo it after each test, or later
    tests' stage subprocesses would track to a module's (stopped) server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset-by-test")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
