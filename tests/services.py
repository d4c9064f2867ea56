"""Real services for integration tests, started on loopback ports and stopped afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from benchmarks import process_cpu
from pipeline.runtime.mlflow_server import MLFLOW_SERVER_VARIABLES
from pipeline.runtime.ports import RAY_NODE_PORTS_OF_ITS_OWN, free_local_port


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
        except Exception:  # noqa: BLE001 - not up yet: a refused connection, a 503, a missing file
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

    def __init__(self, workdir: Path, access_key: str = "hmsa-test", secret_key: str = "hmsa-test-secret"):
        self.workdir = workdir
        self.access_key, self.secret_key = access_key, secret_key
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        (workdir / "data").mkdir(parents=True)
        config = workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "tests", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.port = free_local_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "weed.log"
        args = [weed, "server", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-s3", f"-s3.port={self.port}", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-webdav=false", "-iam=false"]
        # Every listener on its own free port, so parallel runs and leftovers never collide.
        for flag in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                     "filer.port.grpc", "s3.port.grpc"):
            args.append(f"-{flag}={free_local_port()}")
        self._args = args
        self.start()

    def start(self) -> None:
        """Start (or start again, with the same ports and data) and wait until it takes writes."""
        self.proc = subprocess.Popen(self._args, stdout=self.log.open("a"), stderr=subprocess.STDOUT)
        wait_until(self._bucket_ready, 60, "SeaweedFS S3 gateway", self.proc, self.log)

    def client(self, secret: str | None = None, quick: bool = False):
        import boto3
        from botocore.config import Config

        config = Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}) if quick else None
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", config=config,
            aws_access_key_id=self.access_key, aws_secret_access_key=secret or self.secret_key)

    def _bucket_ready(self) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client(quick=True).create_bucket(Bucket="ready-check")
        except ClientError as err:  # started again: the bucket is there from the first start
            if err.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        return True

    def env(self) -> dict:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self) -> None:
        stop(self.proc, grace=2)  # throwaway data: no need to wait for a clean shutdown


class RayHead:
    """A local Ray cluster started with `ray start --head`, which stage subprocesses join."""

    def __init__(self, num_cpus: int = 4, **node_env):
        import tempfile

        # Ray's Unix socket paths must stay short: a temp dir right under /tmp.
        workdir = self.workdir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        self.port = free_local_port()
        self.address = f"127.0.0.1:{self.port}"
        ray_bin = str(Path(sys.executable).parent / "ray")
        # Ray clusters started with `ray start` require token authentication; this one has its own.
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex()}
        # The dashboard serves the State API, which Ray Train's placement-group cleaner needs to free
        # a stopped Tune trial's workers; the variable makes it use this cluster's even when another
        # Ray runs on the machine (it would otherwise fail to choose, and the next trial wait forever).
        dashboard = free_local_port()
        # `node_env`: what a node of a real cluster holds in its own environment (credentials).
        self.env = python_env(RAY_ADDRESS="", RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dashboard}", **self.auth,
                              **node_env)
        subprocess.run([ray_bin, "start", "--head", f"--port={self.port}", f"--num-cpus={num_cpus}",
                        "--num-gpus=0", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                        f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_local_port()}",
                        *RAY_NODE_PORTS_OF_ITS_OWN, f"--temp-dir={workdir}"],
                       check=True, capture_output=True, env=self.env)
        self._ray_bin = ray_bin

    def client_env(self) -> dict:
        """What a stage subprocess needs to join this cluster."""
        return {"RAY_ADDRESS": self.address, **self.auth}

    def describe(self) -> str:
        """The cluster's resources, placement groups and live actors: what a test that timed out
        waiting on this cluster prints, so a hang in CI can be read from its log."""
        env = python_env(RAY_ADDRESS=self.address, **self.auth)
        parts = []
        for args in (["status"], ["list", "placement-groups", "--detail"],
                     ["list", "actors", "--filter", "state!=DEAD"]):
            done = subprocess.run([self._ray_bin, *args], capture_output=True, text=True, env=env, timeout=60)
            parts.append(f"$ ray {' '.join(args)}\n{(done.stdout + done.stderr)[-4000:]}")
        return "\n".join(parts)

    def leak_placement_group(
        self, cpus: float, job: str | None = None, actor: str | None = None, detached: bool = False
    ) -> str:
        """Leave this cluster in the state a training killed while it starts leaves: a CREATED
        placement group of `cpus` CPUs registered after Ray's events for its creator (so Ray never
        frees it). Returns its id. By default its creator job and actor are both gone (a killed
        driver); with `job` and `actor` (hex ids), the job may live on and only the actor be dead
        (a stopped Tune trial's controller).

        The race that makes it (the request arriving after its creator's end) cannot be timed from
        outside, so this sends the same request Ray's core worker sends."""
        import grpc
        from ray.core.generated import common_pb2, gcs_service_pb2, gcs_service_pb2_grpc

        if job is None:
            ended_job = (
                "import ray\n"
                "@ray.remote(num_cpus=0)\n"
                "class Controller:\n"
                "    def ping(self): return 1\n"
                "controller = Controller.remote(); ray.get(controller.ping.remote())\n"
                "print(ray.get_runtime_context().get_job_id(), controller._actor_id.hex())\n"
            )
            done = subprocess.run(
                [sys.executable, "-c", ended_job],
                capture_output=True,
                text=True,
                timeout=120,
                env=python_env(**self.client_env()),
                check=True,
            )
            job, actor = done.stdout.split()[-2:]
        group = os.urandom(14) + bytes.fromhex(job)  # a placement group id ends with its job's id
        bundle = common_pb2.Bundle(
            bundle_id=common_pb2.Bundle.BundleIdentifier(placement_group_id=group, bundle_index=0),
            unit_resources={"CPU": float(cpus)},
        )
        spec = common_pb2.PlacementGroupSpec(
            placement_group_id=group,
            strategy=common_pb2.PACK,
            bundles=[bundle],
            creator_job_id=bytes.fromhex(job),
            creator_actor_id=bytes.fromhex(actor),
            creator_job_dead=False,
            creator_actor_dead=False,
            is_detached=detached,
        )
        with grpc.insecure_channel(self.address) as channel:
            gcs_service_pb2_grpc.PlacementGroupInfoGcsServiceStub(channel).CreatePlacementGroup(
                gcs_service_pb2.CreatePlacementGroupRequest(placement_group_spec=spec),
                timeout=30,
                metadata=[("authorization", f"Bearer {self.auth['RAY_AUTH_TOKEN']}")],
            )
        return group.hex()

    def placement_group_states(self) -> dict[str, str]:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                "import json, ray; ray.init(); "
                "print(json.dumps({k: g['state'] for k, g in ray.util.placement_group_table().items()}))",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=python_env(**self.client_env()),
            check=True,
        )
        return json.loads(done.stdout.strip().splitlines()[-1])

    def processes(self, processes: process_cpu.Snapshot | None = None) -> dict[int, str]:
        """This cluster's processes (pid -> command line; Ray titles a worker after its task or
        actor), and no other Ray's: tests may run beside other clusters on the machine."""
        processes = processes or process_cpu.snapshot()
        mine = set()
        for pid, args in processes.command_lines.items():
            # with every descendant: workers, agents, dashboard modules
            if self.workdir in args or f"--address={self.address} " in f"{args} ":
                mine |= process_cpu.descendants(processes, pid)
        return {pid: processes.command_lines.get(pid, "") for pid in mine}

    def stop(self) -> None:
        """Stop this cluster's processes only. (`ray stop` would stop every Ray on the machine,
        another test's cluster or a user's included.)"""
        import signal

        mine = set(self.processes())
        for sig, grace in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            for pid in mine:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.time() + grace
            while time.time() < deadline and any(_alive(pid) for pid in mine):
                time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class MlflowServer:
    """A real `mlflow server` process with a SQLite backend and a local artifact root; with
    `admin_password`, MLflow's basic-auth app, whose only user is `admin`."""

    def __init__(self, workdir: Path, admin_password: str | None = None):
        self.port = free_local_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "mlflow.log"
        mlflow_bin = str(Path(sys.executable).parent / "mlflow")
        args = [
            mlflow_bin,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{workdir / 'mlflow.db'}",
            "--artifacts-destination",
            str(workdir / "artifacts"),
            "--workers",
            "1",
        ]
        env = python_env(**MLFLOW_SERVER_VARIABLES)
        if admin_password is not None:
            # The repository's own auth config, with this folder's user database.
            config = (Path(__file__).resolve().parents[1] / "infra" / "mlflow" / "basic_auth.ini").read_text()
            config = config.replace("sqlite:////mlflow/basic_auth.db", f"sqlite:///{workdir / 'basic_auth.db'}")
            (workdir / "basic_auth.ini").write_text(config)
            env.update(
                MLFLOW_AUTH_CONFIG_PATH=str(workdir / "basic_auth.ini"),
                MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
                MLFLOW_FLASK_SERVER_SECRET_KEY=os.urandom(16).hex(),
            )
            args += ["--app-name", "basic-auth"]
        self._args, self._env, self._workdir = args, env, workdir
        self.start()

    def start(self) -> None:
        """Start (or start again, on the same port and store) and wait until it answers."""
        import urllib.request

        self.proc = subprocess.Popen(
            self._args, stdout=self.log.open("a"), stderr=subprocess.STDOUT, cwd=self._workdir, env=self._env
        )
        wait_until(
            lambda: urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200,
            90,
            "mlflow server",
            self.proc,
            self.log,
        )

    def stop(self) -> None:
        stop(self.proc)


STACK = str(Path(__file__).resolve().parents[1] / "infra" / "local" / "stack.py")


@contextmanager
def local_stack(state: Path, *flags: str):
    """infra/local/stack.py started with `flags` (state in `state`), stopped after: its variables,
    and an environment for the pipeline's processes that joins it."""
    done = subprocess.run([sys.executable, STACK, "start", "--state", str(state), "--free-ports", "--json", *flags],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    variables = json.loads(done.stdout.strip().splitlines()[-1])
    try:
        yield SimpleNamespace(state=state, variables=variables, env=python_env(**variables))
    finally:
        subprocess.run([sys.executable, STACK, "stop", "--state", str(state)], capture_output=True, timeout=120)
