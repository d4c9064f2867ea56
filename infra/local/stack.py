"""A local stand-in for a cluster: services on loopback and Ray worker nodes that see none of the
driver's files, so a driver path that leaks into a worker fails here as on a real cluster.

    .venv/bin/python infra/local/stack.py start     # prints the variables to export
    .venv/bin/python infra/local/stack.py stop
    .venv/bin/python infra/local/stack.py stop-node 2 / start-node 2   # take a worker node away / back
    .venv/bin/python infra/local/stack.py start --services-only   # S3 and MLflow, beside your own Ray
    .venv/bin/python infra/local/stack.py start --autoscale       # no worker node until work asks

What it starts (state, logs and pids in --state, default .local-stack/):
  - SeaweedFS with its S3 gateway and an identities file (credentials are checked), bucket `hmsa`
  - an MLflow server (SQLite backend in the state folder) whose artifacts go to s3://hmsa/mlartifacts
  - a Ray head with no CPUs (it schedules; it trains nothing), token authentication on
  - N Ray worker nodes (default 2), each in its own Linux mount namespace (`unshare -m`, needs root)
    where the repository and /tmp are empty tmpfs mounts: only the Python environment is visible.
    Workers get the code from the job's runtime_env and the data from S3, or they fail.
With --services-only, only the first two: no Ray at all (a second Ray on the machine would make
Ray's own tools fail to choose between them), and no RAY_ADDRESS among the variables.
With --autoscale, the cluster starts as a real autoscaled one does, with the head alone: Ray's own
autoscaler (its fake multi-node provider, which launches nodes as processes on this machine) adds
worker nodes of --cpus-per-node CPUs (and --fake-gpus-per-node GPUs, declared only: for rehearsing
`ray.use_gpu: auto`; nothing can compute on them), up to --workers of them, when work asks for them, and removes
them after a minute idle. The head and everything the autoscaler launches run in one mount
namespace where the repository and /tmp are empty, as the worker nodes above do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from pipeline.runtime.mlflow_server import MLFLOW_SERVER_VARIABLES
from pipeline.runtime.ports import RAY_NODE_PORTS_OF_ITS_OWN, free_local_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
VENV = Path(sys.prefix)
BUCKET = "hmsa"
DEFAULT_PORTS = {"s3": 8333, "mlflow": 5000, "ray": 6379, "dashboard": 8265}


def wait_for(check, what: str, timeout: float, *logs: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    tails = "\n".join(f"its log {log} ends with:\n{log.read_text()[-2000:]}" for log in logs if log.exists())
    raise SystemExit(f"{what} did not come up in {timeout:.0f} s; {tails}")


def spawn(args: list[str], log: Path, env: dict, pidfile: Path) -> subprocess.Popen:
    """A service in a session of its own (so `stop` can end it and everything it started)."""
    proc = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd="/",
                            start_new_session=True)
    pidfile.write_text(str(proc.pid))
    return proc


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def kill_groups(pidfiles: list[Path], sig=signal.SIGTERM, grace: float = 10) -> None:
    """End services and everything they started: `sig` to all at once, then SIGKILL to those still
    there after `grace` seconds (one wait for all, not one per service)."""
    groups = [int(text) for text in (p.read_text().strip() for p in pidfiles if p.exists()) if text.isdigit()]
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
    deadline = time.time() + grace
    while any(group_alive(g) for g in groups) and time.time() < deadline:
        time.sleep(0.2)
    for pgid in groups:
        if group_alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
    for pidfile in pidfiles:
        pidfile.unlink(missing_ok=True)



def hidden_from_the_driver(command: list[str]) -> list[str]:
    """`command` in a mount namespace of its own where the repository and /tmp are empty: only the
    Python environment stays visible, as on another machine."""
    lines = ["set -e", "mount --make-rprivate /"]
    venv_hidden = REPO in VENV.parents or Path("/tmp") in VENV.parents
    if venv_hidden:
        # Bind the Python environment to a folder of its own outside what gets hidden, hide the
        # rest, bind it back, and drop that folder. Each namespace has its own folder and removes
        # it itself: several stacks start and stop side by side (the test suite's processes), and
        # a folder taken away mid-start by another stack's clean-up made a node fail to start.
        hold = Path(tempfile.mkdtemp(prefix="hmsa-venv-", dir="/run"))
        lines.append(f"mount --bind '{VENV}' '{hold}'")
    lines.append("mount -t tmpfs hmsa-hidden /tmp")
    if Path("/tmp") not in REPO.parents:  # a checkout under /tmp is hidden already
        lines.append(f"mount -t tmpfs hmsa-hidden '{REPO}'")
    if venv_hidden:
        lines += [f"mkdir -p '{VENV}'", f"mount --bind '{hold}' '{VENV}'", f"umount '{hold}'", f"rmdir '{hold}'"]
    lines += ["cd /", "exec " + shlex.join(command)]
    return ["unshare", "-m", "--propagation", "private", "bash", "-c", "\n".join(lines)]


def autoscaling_config(gcs_port: int, max_workers: int, cpus_per_node: int, fake_gpus_per_node: int = 0) -> dict:
    """Ray's fake multi-node provider (the one behind ray.cluster_utils.AutoscalingCluster, whose
    example config the pip wheel lacks): worker nodes are processes on this machine. The provider
    must be told this cluster's GCS port, or it joins its nodes to a Ray on the default 6379."""
    return {
        "cluster_name": "hmsa-local", "max_workers": max_workers, "idle_timeout_minutes": 1, "upscaling_speed": 1.0,
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{gcs_port}", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "worker-node": {"resources": {"CPU": cpus_per_node, **({"GPU": fake_gpus_per_node} if fake_gpus_per_node
                                                                    else {})},
                            "node_config": {}, "min_workers": 0, "max_workers": max_workers},
        },
        "head_node_type": "ray.head.default",
        **{key: [] for key in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                               "setup_commands", "head_setup_commands", "worker_setup_commands",
                               "head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }


class Stack:
    def __init__(self, state: Path):
        self.state = state.resolve()
        self.settings_file = self.state / "stack.json"

    @property
    def settings(self) -> dict:
        return json.loads(self.settings_file.read_text())

    # --- start -------------------------------------------------------------------------------
    def start(self, workers: int, cpus_per_node: int, free_ports: bool, services_only: bool = False,
              autoscale: bool = False, fake_gpus_per_node: int = 0) -> dict:
        if self.settings_file.exists():
            raise SystemExit(f"a stack is already running from {self.state}: stop it first")
        self.state.mkdir(parents=True, exist_ok=True)
        ports = {k: (free_local_port() if free_ports else v) for k, v in DEFAULT_PORTS.items()}
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID") or "hmsa-local", secrets.token_hex(16)
        settings = {"ports": ports, "access_key": key, "secret_key": secret, "workers": 0 if services_only else workers,
                    "cpus_per_node": cpus_per_node, "token": secrets.token_hex(16), "free_ports": free_ports,
                    "services_only": services_only, "autoscale": autoscale, "fake_gpus_per_node": fake_gpus_per_node}
        self.settings_file.write_text(json.dumps(settings))
        self.settings_file.chmod(0o600)
        try:
            self._start_s3(settings)
            self._start_mlflow(settings)
            if autoscale:
                self._start_autoscaling_head(settings)
                self._wait_for_nodes(1, marker=" ray.head.default")
            elif not services_only:
                started = {"ray-head": self._start_head(settings)}  # by the names of their logs
                started.update({f"ray-node-{node}": self.start_node(node) for node in range(1, workers + 1)})
                self._wait_for_nodes(workers + 1, started=started)
        except BaseException:
            self.stop()
            raise
        return self.variables()

    def _aws_env(self, s: dict) -> dict:
        return {"AWS_ACCESS_KEY_ID": s["access_key"], "AWS_SECRET_ACCESS_KEY": s["secret_key"],
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s['ports']['s3']}"}

    def _start_s3(self, s: dict) -> None:
        identities = {"identities": [{"name": "hmsa", "credentials": [{"accessKey": s["access_key"],
                                                                       "secretKey": s["secret_key"]}],
                                      "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        config = self.state / "s3-identities.json"
        config.write_text(json.dumps(identities))
        config.chmod(0o600)
        (self.state / "weed").mkdir(exist_ok=True)
        args = [str(BIN / "weed"), "server", f"-dir={self.state / 'weed'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-s3", f"-s3.port={s['ports']['s3']}", f"-s3.config={config}", "-s3.port.iceberg=0",
                "-s3.port.lance=0", "-webdav=false", "-iam=false"]
        if s["free_ports"]:
            for flag in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                         "filer.port.grpc", "s3.port.grpc"):
                args.append(f"-{flag}={free_local_port()}")
        log = self.state / "weed.log"
        spawn(args, log, dict(os.environ), self.state / "weed.pid")

        def bucket_ready() -> bool:
            client = self.s3_client()
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=BUCKET)
            return True

        wait_for(bucket_ready, "the SeaweedFS S3 gateway", 90, log)

    def s3_client(self):
        import boto3
        from botocore.config import Config

        s = self.settings
        return boto3.session.Session().client(
            "s3", endpoint_url=f"http://127.0.0.1:{s['ports']['s3']}", region_name="us-east-1",
            aws_access_key_id=s["access_key"], aws_secret_access_key=s["secret_key"],
            config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))

    def _start_mlflow(self, s: dict) -> None:
        env = {**os.environ, **self._aws_env(s), **MLFLOW_SERVER_VARIABLES,
               "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{s['ports']['s3']}"}
        uri = f"http://127.0.0.1:{s['ports']['mlflow']}"
        args = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(s["ports"]["mlflow"]),
                "--backend-store-uri", f"sqlite:///{self.state / 'mlflow.db'}",
                "--artifacts-destination", f"s3://{BUCKET}/mlartifacts", "--workers", "1"]
        log = self.state / "mlflow.log"
        spawn(args, log, env, self.state / "mlflow.pid")
        wait_for(lambda: urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200, "the MLflow server",
                 120, log)

    def _ray_env(self) -> dict:
        s = self.settings
        # Token authentication; Ray kept on loopback (one machine standing in for several).
        # RAY_API_SERVER_ADDRESS: Ray Train's placement-group cleaner (in every worker) finds the State
        # API of this cluster, not by scanning the machine, where another Ray may run (it then
        # cannot tell which, never frees a stopped Tune trial's workers, and the next trial waits).
        # The nodes hold their own S3 credentials, as pods get them from a Secret: a job never carries
        # credentials (Ray would write its runtime_env into its logs).
        return {**os.environ, **self._aws_env(s), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": s["token"],
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{s['ports']['dashboard']}"}

    def _head(self, s: dict, temp: Path, *extra: str) -> tuple[list[str], dict]:
        """The command and environment of a head with no CPUs (it schedules; it trains nothing)."""
        # A lost node is declared dead after about 3 s (Ray's default is about 15 s on real clusters),
        # so an elastic run on this stand-in shrinks and grows within seconds.
        env = {**self._ray_env(), "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
        args = [str(BIN / "ray"), "start", "--head", "--block", f"--port={s['ports']['ray']}", "--num-cpus=0",
                "--num-gpus=0", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *extra,
                f"--dashboard-port={s['ports']['dashboard']}", f"--ray-client-server-port={free_local_port()}",
                f"--temp-dir={temp}", *RAY_NODE_PORTS_OF_ITS_OWN]
        return args, env

    def _start_head(self, s: dict) -> subprocess.Popen:
        args, env = self._head(s, Path(f"/tmp/ray-head-{s['ports']['ray']}"))  # Ray's socket paths must stay short
        return spawn(args, self.state / "ray-head.log", env, self.state / "ray-head.pid")

    def start_node(self, node: int) -> subprocess.Popen:
        """A worker node in its own mount namespace: the repository and /tmp are empty there."""
        s = self.settings
        ray_args = [str(BIN / "ray"), "start", "--block", f"--address=127.0.0.1:{s['ports']['ray']}",
                    f"--num-cpus={s['cpus_per_node']}", "--num-gpus=0", "--node-ip-address=127.0.0.1",
                    "--disable-usage-stats", *RAY_NODE_PORTS_OF_ITS_OWN]
        return spawn(hidden_from_the_driver(ray_args), self.state / f"ray-node-{node}.log",
                     self._ray_env(), self.state / f"ray-node-{node}.pid")

    def _start_autoscaling_head(self, s: dict) -> None:
        """A head with no CPUs and Ray's autoscaler, in a mount namespace that hides the driver's
        files: every node the autoscaler launches is a process of that namespace too. Ray's session
        folder is under /run, which stays shared: the driver on this machine reaches the head's
        sockets there, as a driver on the head of a real cluster does."""
        temp = Path(f"/run/hmsa-ray-{s['ports']['ray']}")  # Ray's socket paths must stay short
        temp.mkdir(parents=True, exist_ok=True)
        config = temp / "autoscaling.json"  # where the head, in its namespace, can read it
        config.write_text(json.dumps(autoscaling_config(s["ports"]["ray"], s["workers"], s["cpus_per_node"],
                                                        s["fake_gpus_per_node"])))
        args, env = self._head(s, temp, f"--autoscaling-config={config}")
        env.update({"RAY_FAKE_CLUSTER": "1",  # the fake provider's own switch
                    "AUTOSCALER_UPDATE_INTERVAL_S": "1"})  # a round a second (real clusters: 5 s)
        spawn(hidden_from_the_driver(args), self.state / "ray-head.log", env,
              self.state / "ray-head.pid")

    def stop_node(self, node: int) -> None:
        """The node goes away at once, as a preempted machine does (SIGKILL, no clean shutdown)."""
        kill_groups([self.state / f"ray-node-{node}.pid"], signal.SIGKILL)

    def _wait_for_nodes(self, count: int, marker: str = "node_",
                        started: dict[str, subprocess.Popen] | None = None) -> None:
        """Until `ray status` lists `count` nodes (an autoscaled cluster lists them by node type).
        One of the nodes just `started` (by its log's name) whose `ray start` ended fails the start at
        once, with its log's end, instead of after the whole wait."""
        def enough() -> bool:
            for name, proc in (started or {}).items():
                if proc.poll() is not None:
                    log = self.state / f"{name}.log"
                    raise SystemExit(f"{name} exited ({proc.returncode}) before the cluster was up; its log {log} "
                                     f"ends with:\n{log.read_text()[-2000:]}")
            done = subprocess.run([str(BIN / "ray"), "status", f"--address=127.0.0.1:{self.settings['ports']['ray']}"],
                                  capture_output=True, text=True, env=self._ray_env(), timeout=30)
            return done.returncode == 0 and done.stdout.count(marker) >= count
        logs = [self.state / "ray-head.log", *sorted(self.state.glob("ray-node-*.log"))]
        # Generous: a node that exits ends the wait at once (above); only slowness waits it out (on a
        # machine busy with other Ray work, a whole stack has taken 83 s to come up).
        wait_for(enough, f"a Ray cluster of {count} nodes", 300, *logs)

    # --- variables and stop ------------------------------------------------------------------
    def variables(self) -> dict:
        s = self.settings
        services = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{s['ports']['mlflow']}",
                    "HMSA_STORAGE": f"s3://{BUCKET}/pipeline", **self._aws_env(s)}
        if s.get("services_only"):
            return services
        return {"RAY_ADDRESS": f"127.0.0.1:{s['ports']['ray']}", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": s["token"], "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", **services}

    def stop(self) -> None:
        kill_groups(sorted(self.state.glob("ray-node-*.pid")), signal.SIGKILL)
        kill_groups([self.state / f"{name}.pid" for name in ("ray-head", "mlflow", "weed")])
        if self.settings_file.exists():
            for temp in ("/tmp/ray-head-{}", "/run/hmsa-ray-{}"):
                shutil.rmtree(Path(temp.format(self.settings["ports"]["ray"])), ignore_errors=True)
            self.settings_file.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "stop", "env", "stop-node", "start-node"])
    parser.add_argument("node", nargs="?", type=int, help="worker node number (stop-node, start-node)")
    parser.add_argument("--state", default=str(REPO / ".local-stack"), help="state folder (default .local-stack)")
    parser.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--fake-gpus-per-node", type=int, default=0,
                        help="--autoscale: GPUs each node declares without having them (rehearses use_gpu: auto)")
    parser.add_argument("--free-ports", action="store_true", help="any free ports instead of 6379/5000/8333")
    parser.add_argument("--json", action="store_true", help="print the variables as JSON")
    parser.add_argument("--services-only", action="store_true",
                        help="S3 and MLflow only, no Ray: for use beside a Ray cluster of your own")
    parser.add_argument("--autoscale", action="store_true",
                        help="start with the head alone; Ray's autoscaler adds up to --workers nodes on demand")
    args = parser.parse_args()
    stack = Stack(Path(args.state))
    if args.command == "stop":
        stack.stop()
        return
    if args.command in ("stop-node", "start-node"):
        if args.node is None:
            parser.error(f"{args.command} needs the node number")
        if not stack.settings_file.exists() or stack.settings.get("services_only") or stack.settings.get("autoscale"):
            raise SystemExit(f"{args.command}: no stack with Ray nodes is running from {stack.state}")
        stack.stop_node(args.node) if args.command == "stop-node" else stack.start_node(args.node)
        return
    if args.command == "start":
        if os.geteuid() != 0 and not args.services_only and args.workers > 0:
            raise SystemExit("worker nodes need their own mount namespaces (unshare -m): run as root")
        if args.fake_gpus_per_node and not args.autoscale:
            parser.error("--fake-gpus-per-node goes with --autoscale")
        stack.start(args.workers, args.cpus_per_node, args.free_ports, services_only=args.services_only,
                    autoscale=args.autoscale, fake_gpus_per_node=args.fake_gpus_per_node)
    variables = stack.variables()
    if args.json:
        print(json.dumps(variables))
    else:
        print("\n".join(f"export {k}={v}" for k, v in variables.items()))


if __name__ == "__main__":
    main()
