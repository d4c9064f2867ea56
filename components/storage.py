"""Read and write files at local paths or s3:// URIs through one small interface.

S3 is reached with boto3; the endpoint (e.g. a SeaweedFS or MinIO gateway) comes from the
configuration, credentials from boto3's usual chain (environment, ~/.aws), never from params.yaml.
Directories are published atomically for readers: locally by rename, on S3 by uploading the
manifest last (readers open the manifest first, so a half-uploaded directory is never read).
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from components.atomic import replace_dir


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = str(uri)[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{uri}: an S3 URI needs a bucket, as in s3://bucket/prefix")
    return bucket, key


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(Path(base, *parts))


class Storage:
    """Local files; `S3Storage` overrides the same methods for s3:// URIs."""

    def read_bytes(self, uri: str) -> bytes:
        try:
            return Path(uri).read_bytes()
        except OSError as err:
            raise FileNotFoundError(f"cannot read {uri}: {err.strerror}") from None

    def read_range(self, uri: str, offset: int, length: int) -> bytes:
        with open(uri, "rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
        if len(data) != length:
            raise ValueError(f"{uri}: expected {length} bytes at offset {offset}, file is truncated")
        return data

    def exists(self, uri: str) -> bool:
        return Path(uri).exists()

    def write_bytes(self, uri: str, data: bytes) -> None:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        Path(uri).write_bytes(data)

    def delete(self, uri: str) -> None:
        Path(uri).unlink(missing_ok=True)

    def publish_dir(self, local_dir: Path, target: str, last: str = "manifest.json") -> None:
        """Move a finished local directory to `target`, replacing what was there."""
        target_path = Path(target)
        target_path.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(Path(local_dir), target_path)

    def publish_once(self, source_dir: Path, target: str, last: str = "manifest.json") -> bool:
        """Copy a local directory to `target` unless it is already there (content-addressed targets:
        what is published is never overwritten). Returns whether this call published it."""
        target_path = Path(target)
        if (target_path / last).is_file():
            return False
        target_path.parent.mkdir(parents=True, exist_ok=True)
        staging = target_path.with_name(f".{target_path.name}.tmp-{uuid.uuid4().hex[:8]}")
        shutil.copytree(source_dir, staging)
        try:
            staging.rename(target_path)
        except OSError:  # another publisher won the race with the same content
            shutil.rmtree(staging, ignore_errors=True)
            return False
        return True


class S3Storage(Storage):
    def __init__(self, endpoint_url: str | None = None, region: str | None = None, quick: bool = False):
        import boto3  # only here: library code does not import boto3 at module top
        from botocore.config import Config

        # quick: for checks that must answer in seconds (a dead endpoint is not retried for minutes).
        config = Config(connect_timeout=3, read_timeout=5, retries={"max_attempts": 1}) if quick else None
        # A session of its own: boto3's default session caches credentials across clients.
        self.endpoint_url = endpoint_url
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region,
                                                     config=config)

    def _get(self, uri: str, **kwargs) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3(uri)
        try:
            return self.client.get_object(Bucket=bucket, Key=key, **kwargs)["Body"].read()
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            raise FileNotFoundError(f"cannot read {uri}: {code or err}") from None
        except BotoCoreError as err:  # no answer at all: the endpoint, not the object, is wrong
            raise ConnectionError(f"cannot read {uri}: {err}") from None

    def read_bytes(self, uri: str) -> bytes:
        return self._get(uri)

    def read_range(self, uri: str, offset: int, length: int) -> bytes:
        data = self._get(uri, Range=f"bytes={offset}-{offset + length - 1}")
        if len(data) != length:
            raise ValueError(f"{uri}: expected {length} bytes at offset {offset}, object is truncated")
        return data

    def exists(self, uri: str) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError:
            return False

    def _upload_dir(self, local_dir: Path, target: str, last: str) -> None:
        bucket, prefix = split_s3(target)
        files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
        # The manifest goes up last: until it exists, readers see no (new) directory.
        files.sort(key=lambda p: p.name == last)
        for path in files:
            key = "/".join(filter(None, [prefix.rstrip("/"), path.relative_to(local_dir).as_posix()]))
            self.client.upload_file(str(path), bucket, key)

    def publish_dir(self, local_dir: Path, target: str, last: str = "manifest.json") -> None:
        self._upload_dir(local_dir, target, last)
        shutil.rmtree(local_dir, ignore_errors=True)

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = split_s3(uri)
        self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def delete(self, uri: str) -> None:
        bucket, key = split_s3(uri)
        self.client.delete_object(Bucket=bucket, Key=key)

    def publish_once(self, source_dir: Path, target: str, last: str = "manifest.json") -> bool:
        if self.exists(join(target, last)):
            return False
        self._upload_dir(source_dir, target, last)
        return True


def storage_for(uri: str, s3_endpoint_url: str | None = None, s3_region: str | None = None,
                quick: bool = False) -> Storage:
    return S3Storage(s3_endpoint_url, s3_region, quick=quick) if is_s3(uri) else Storage()
