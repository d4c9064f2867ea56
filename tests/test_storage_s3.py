"""Pyramids on S3: the pyramid stage writes to a real S3 endpoint and the loader reads it back."""

import subprocess
import sys

import numpy as np
import pytest

from components.data.pyramid import PyramidReader, content_hash
from components.storage import S3Storage, Storage
from tests.services import python_env

pytestmark = pytest.mark.integration


def test_pyramid_published_to_s3_once_reads_back_identically(tmp_path, s3_server, monkeypatch):
    """The pyramid stage writes locally (DVC tracks it); training publishes it to S3 under its
    content hash, once, and workers read it there byte for byte."""
    s3_server.client().create_bucket(Bucket="pyramids")
    params = tmp_path / "params.yaml"
    params.write_text(
        f"prepare:\n  output: {tmp_path / 'raw'}\n"
        "  synthetic: {train_images: 3, val_images: 2, height: 48, width: 64}\n"
        f"pyramid:\n  output: {tmp_path / 'local'}\n  shard_size: 2\n"
    )
    for stage in ("prepare", "pyramid"):
        subprocess.run(
            [sys.executable, "-m", f"pipeline.{stage}", "--params", str(params)],
            check=True,
            env=python_env(),
            capture_output=True,
        )
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    target = f"s3://pyramids/published/{content_hash(tmp_path / 'local')}"
    storage = S3Storage(s3_server.endpoint)
    assert storage.publish_once(tmp_path / "local", target) is True
    assert storage.publish_once(tmp_path / "local", target) is False  # published once, never overwritten
    remote = PyramidReader(target, storage)
    local = PyramidReader(str(tmp_path / "local"), Storage())
    for split in ("train", "val"):
        for i in range(len(local.entries(split))):
            a, b = remote.read(split, i, remote.scales), local.read(split, i, local.scales)
            assert all(np.array_equal(a[s][0], b[s][0]) and np.array_equal(a[s][1], b[s][1]) for s in a)


def test_wrong_credentials_name_the_uri(s3_server, monkeypatch):
    s3_server.client().create_bucket(Bucket="secrets")
    s3_server.client().put_object(Bucket="secrets", Key="manifest.json", Body=b"{}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(FileNotFoundError, match=r"s3://secrets/manifest.json: SignatureDoesNotMatch"):
        S3Storage(s3_server.endpoint).read_bytes("s3://secrets/manifest.json")
