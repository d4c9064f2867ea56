"""Real services for integration tests, started on loopback ports and stopped afterwards."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited early:\n{log.read_text()[-3000:] if log else ''}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not come up in {timeout}s:\n{log.read_text()[-3000:] if log else ''}")


def stop(proc: subprocess.Popen, grace: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class SeaweedS3:
    """A SeaweedFS server (master, volume, filer) with its S3 gateway and one access key."""

    access_key, secret_key = "hmsa-test", "hmsa-test-secret"

    def __init__(self, workdir: Path):
        self.workdir = workdir
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        (workdir / "data").mkdir(parents=True)
        config = workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "tests", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "weed.log"
        args = [weed, "server", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-s3", f"-s3.port={self.port}", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-webdav=false", "-iam=false"]
        # Every listener on its own free port, so parallel runs and leftovers never collide.
        for flag in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                     "filer.port.grpc", "s3.port.grpc"):
            args.append(f"-{flag}={free_port()}")
        self.proc = subprocess.Popen(args, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        wait_until(self._bucket_ready, 60, "SeaweedFS S3 gateway", self.proc, self.log)

    def client(self, secret: str | None = None, quick: bool = False):
        import boto3
        from botocore.config import Config

        config = Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}) if quick else None
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", config=config,
            aws_access_key_id=self.access_key, aws_secret_access_key=secret or self.secret_key)

    def _bucket_ready(self) -> bool:
        self.client(quick=True).create_bucket(Bucket="ready-check")
        return True

    def env(self) -> dict:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self) -> None:
        stop(self.proc, grace=2)  # throwaway data: no need to wait for a clean shutdown


def python_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(extra)
    return env
