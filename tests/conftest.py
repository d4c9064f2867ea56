import os
import tempfile

import pytest
import torch

# Hypothesis keeps its files (example database, caches) here, not in the checkout: tests write
# nothing into the repository.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", tempfile.mkdtemp(prefix="hmsa-hypothesis-"))

from components.config import ModelConfig


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def tiny_model_config(**overrides) -> ModelConfig:
    """A model small enough for 64x64 CPU tests: tiny trunk, 32-channel decoder and heads."""
    values = dict(trunk="tiny", decoder="deeplabv3plus", decoder_channels=32, attention_channels=32, num_classes=5)
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
