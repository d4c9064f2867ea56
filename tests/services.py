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


def python_env(**extra) -> dict:
    """The environment for service and stage subprocesses.

    Ray turns a loopback address into the machine's external IP unless told that this is a
    single-machine setup; tests keep every Ray connection on loopback.
    """
    env = dict(os.environ)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env.update(extra)
    return env


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            output = log.read_text() if log else (proc.stdout.read() if proc.stdout else "")
            raise RuntimeError(f"{what}: the process exited early:\n{output[-3000:]}")
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


class RayHead:
    """A local Ray cluster started with `ray start --head`, which stage subprocesses join."""

    def __init__(self, num_cpus: int = 4):
        import tempfile

        # Ray's Unix socket paths must stay short: a temp dir right under /tmp.
        workdir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        ray_bin = str(Path(sys.executable).parent / "ray")
        # Ray clusters started with `ray start` require token authentication; this one has its own.
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex()}
        # The dashboard serves the State API, which Ray Train's placement-group cleaner needs to free
        # a stopped Tune trial's workers; the variable makes it use this cluster's even when another
        # Ray runs on the machine (it would otherwise fail to choose, and the next trial wait forever).
        dashboard = free_port()
        self.env = python_env(RAY_ADDRESS="", RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dashboard}", **self.auth)
        subprocess.run([ray_bin, "start", "--head", f"--port={self.port}", f"--num-cpus={num_cpus}",
                        "--num-gpus=0", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                        f"--dashboard-port={dashboard}",
                        f"--temp-dir={workdir}"], check=True, capture_output=True, env=self.env)
        self._ray_bin = ray_bin

    def client_env(self) -> dict:
        """What a stage subprocess needs to join this cluster."""
        return {"RAY_ADDRESS": self.address, **self.auth}

    def stop(self) -> None:
        subprocess.run([self._ray_bin, "stop", "--force"], capture_output=True, env=self.env)


class MlflowServer:
    """A real `mlflow server` process with a SQLite backend and a local artifact root."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "mlflow.log"
        mlflow_bin = str(Path(sys.executable).parent / "mlflow")
        self.proc = subprocess.Popen(
            [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
             "--artifacts-destination", str(workdir / "artifacts"), "--workers", "1"],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, cwd=workdir)
        import urllib.request

        wait_until(lambda: urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200, 90,
                   "mlflow server", self.proc, self.log)

    def stop(self) -> None:
        stop(self.proc)
