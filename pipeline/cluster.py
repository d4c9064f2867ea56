"""Connecting to Ray and checking, before training starts, that the run can actually be placed.

A worker node shares nothing with the driver but the network (DESIGN section 6). So when Ray
workers may run on another node, the driver ships the code it runs from (a runtime_env
working_dir) and the variables for storage and tracking, publishes the pyramid to shared storage,
refuses a tracking store only this machine can write, and runs a pre-flight task on every node.
Each check fails in seconds with one line that names the setting to change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import uuid
from pathlib import Path

from components.config import PipelineConfig
from components.data.pyramid import content_hash
from components.redact import redact
from components.storage import is_s3, join
from pipeline.common import VERBOSE_VARIABLE
from pipeline.environment import Environment
from pipeline.errors import ClusterError

REPO_ROOT = Path(__file__).resolve().parent.parent
# The code DVC hashes: a change here is a new run (never a resume of the old one).
CODE_DIRS = ("components", "pipeline")
# Never shipped to workers: environments, data and outputs (Ray also honours .gitignore). Patterns
# are gitignore-style: the leading slash anchors them at the root (`data` alone would also drop
# components/data).
WORKING_DIR_EXCLUDES = ["/.git", "/.venv", "/.dvc/cache", "/.dvc/tmp", "/data", "/models", "/results",
                        "/ray_results", "/mlruns", "/mlartifacts", "*.db", "/.local-stack", "__pycache__"]
PREFLIGHT_TIMEOUT_S = 60


# --- services, checked from the driver before Ray starts ---------------------------------------

# Where MLflow keeps runs: a server, Databricks, a SQLAlchemy database, or files.
TRACKING_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc", "sqlite", "postgresql", "mysql", "mssql",
                    "file", "")


def check_tracking(env: Environment) -> None:
    """A tracking URI MLflow can use (an unknown scheme used to fail only after Ray had started);
    a server must answer within seconds (not after minutes of client retries)."""
    from urllib.parse import urlparse

    scheme = urlparse(env.tracking_uri).scheme.split("+")[0].lower()  # postgresql+psycopg2: the dialect
    if scheme not in TRACKING_SCHEMES:
        raise ClusterError(f"MLFLOW_TRACKING_URI = {redact(env.tracking_uri)}: unsupported scheme {scheme!r} "
                           "(http(s):// for a tracking server, sqlite:/// or a folder for a local store)")
    if env.tracking_is_local:
        return
    problem = tracking_problem(env.tracking_uri)
    if problem:
        raise ClusterError(f"MLFLOW_TRACKING_URI = {env.tracking_uri}: {problem}")


def tracking_problem(uri: str) -> str | None:
    """None when the server's /health answers 200, else why not. Credentials come from the URI
    (user:password@host, which requests turns into basic auth) or MLFLOW_TRACKING_USERNAME/PASSWORD,
    as the MLflow client itself sends them."""
    import requests

    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    try:
        answer = requests.get(f"{uri.rstrip('/')}/health", timeout=5,
                              auth=(user, password) if user and password else None)
    except (requests.RequestException, ValueError) as err:
        reason = re.search(r"\[Errno -?\d+\] [^'\")]+", str(err))  # the socket's own words, if any
        return f"no MLflow server answers there ({reason.group(0) if reason else type(err).__name__})"
    if answer.status_code in (401, 403):
        return (f"the server refused the credentials (HTTP {answer.status_code}; set them in the URI or in "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)")
    return None if answer.status_code == 200 else f"the server answered HTTP {answer.status_code}"


# What S3 answers when it refuses the credentials (the user's to fix: keys or profile).
CREDENTIAL_REFUSALS = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")
# What pyarrow, botocore and the OS say when object storage cannot be reached or refuses.
STORAGE_FAILURE_MARKERS = ("AWS Error", "curlCode", "Could not connect", "Connection refused", "NoSuchBucket",
                           *CREDENTIAL_REFUSALS)


def storage_failure(err: BaseException, root: str) -> ClusterError | None:
    """A training that stopped because storage failed (Ray reports it as a controller or worker
    error with a long traceback) as one line naming HMSA_STORAGE, or None for any other failure."""
    seen, current = [], err
    while current is not None and current not in seen:  # the error and what caused it
        seen.append(current)
        current = current.__cause__ or current.__context__
    for error in seen:
        for line in str(error).splitlines():
            if any(marker in line for marker in STORAGE_FAILURE_MARKERS):
                return ClusterError(f"HMSA_STORAGE = {root}: training stopped because the storage failed "
                                    f"({line.strip()[:300]}); the checkpoints registered before are kept: once "
                                    "the storage answers, run the stage again to resume")
    return None


def storage_problem(env: Environment, root: str) -> str | None:
    """Write and delete a probe under `root`; None when that works."""
    probe = join(root, f".write-test-{uuid.uuid4().hex}")
    try:
        storage = env.storage(root, quick=True)
        storage.write_bytes(probe, b"ok")
        storage.delete(probe)
    except Exception as err:  # noqa: BLE001 - botocore and OSError alike become one line
        text = str(err).split("\n")[0]
        if is_s3(root) and ("credentials" in text.lower() or any(code in text for code in CREDENTIAL_REFUSALS)):
            text += " (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
        elif is_s3(root) and ("connect" in text.lower() or "endpoint" in text.lower()):
            text += f" (check AWS_ENDPOINT_URL = {env.s3_endpoint})"
        return f"cannot write there: {text}"
    return None


def check_storage(env: Environment) -> str:
    """Make sure checkpoints can be written; returns the checkpoint root."""
    root = env.checkpoint_root()
    problem = storage_problem(env, root)
    if problem:
        variable = "HMSA_STORAGE" if env.storage_root else "the working directory (./ray_results)"
        raise ClusterError(f"{variable} = {env.storage_root or root}: {problem}")
    return root


# --- Ray ---------------------------------------------------------------------------------------

def _check_reachable(address: str) -> None:
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            return
    except (OSError, ValueError) as err:
        raise ClusterError(
            f"RAY_ADDRESS = {address!r}: no Ray cluster answers there ({err}). Start one with `ray start "
            "--head`, fix the address, or unset RAY_ADDRESS for a local Ray."
        ) from None


# Error-level lines Ray prints on runs that succeed, about its own internals, that no setting of
# ours or the user's changes. Ray Train starts a preemption watcher per run on a cluster and passes
# it the workers' handles, which Ray keeps in the object store; Ray then warns that the actor's
# restart could fail (ray-project/ray#53727), once per worker group, on every run.
KNOWN_RAY_NOISE = ("Actor with class name: 'PreemptionWatcher'",)


def _drop_from_driver_log(known: tuple[str, ...]) -> None:
    """Leave out of the worker output Ray forwards to this driver the lines that contain any of
    `known`. Ray has no public filter: its forwarding handler is wrapped where it is registered; if
    that changes in a Ray release, the lines are shown as before."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        forward = dict(dispatcher.handlers)["ray_print_logs"]
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):
        return

    def forward_all_but_known(data: dict) -> None:
        lines = [line for line in data.get("lines", []) if not any(text in line for text in known)]
        if lines:
            forward({**data, "lines": lines})

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", forward_all_but_known)


def connect(env: Environment) -> str:
    """Join the cluster of RAY_ADDRESS, or start a local Ray; returns a description for the log.

    On a cluster the job carries the code this checkout holds (what DVC hashed) and the variables
    workers need; workers never run whatever copy their image happens to have."""
    import ray

    if ray.is_initialized():
        return "the Ray instance already running in this process"
    if env.ray_address:
        _check_reachable(env.ray_address)
        os.environ.update(cluster_only_variables())  # read where a run starts: here, or in a Tune trial
        runtime_env = {"working_dir": str(REPO_ROOT), "excludes": WORKING_DIR_EXCLUDES,
                       "env_vars": {**env.worker_variables(), **train_controller_variables(),
                                    **cluster_only_variables()}}
        ray.init(address=env.ray_address, runtime_env=runtime_env, log_to_driver=True)
        if os.environ.get(VERBOSE_VARIABLE) != "1":
            _drop_from_driver_log(KNOWN_RAY_NOISE)
        return f"the Ray cluster at {redact(env.ray_address)}"
    # A local instance listens on loopback only: nothing outside this machine needs to reach it.
    # Its processes inherit RAY_API_SERVER_ADDRESS, so Ray Train's placement-group cleaner queries
    # this instance's State API even when another Ray runs on the machine (scanning for one, it
    # would fail to choose and never free a stopped Tune trial's workers).
    dashboard = _free_local_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
    os.environ.update(train_controller_variables())  # the local Ray's processes inherit them
    os.environ.update(local_only_variables())
    if os.environ.get(VERBOSE_VARIABLE) != "1":
        # Ray turns token authentication on for a local instance and says so in a warning on every
        # start; this one is the stage's own, on loopback, and ends with it.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(_node_ip_address="127.0.0.1", dashboard_port=dashboard)
    return "a local Ray instance"


# Ray Train's controller takes a worker's report when it polls the workers, every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), and a worker's next report waits until the
# previous one was taken (a queue of one). Epochs shorter than the interval were stretched to it:
# the ablation's 0.9 s epochs took 2.0 s. A poll is one small task per worker; a poll a worker is
# too busy to answer in time is waited for in the next round (a hang counts after 10 minutes).
TRAIN_POLL_INTERVAL_S = "0.2"


def train_controller_variables() -> dict[str, str]:
    """Settings of the Train controller, for every process of the job (a user's own value wins)."""
    return {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
                                                                TRAIN_POLL_INTERVAL_S)}


PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def local_only_variables() -> dict[str, str]:
    """Settings for a local Ray instance only (a user's own value wins).

    Ray Train starts a preemption watcher per run, an actor that polls for nodes being drained (an
    autoscaler or a spot reclaim). Nothing drains the node of an instance this process started, and
    on a 2-core machine every process of Ray's that wakes up takes time from the training threads
    (benchmarks.orchestration shows the cores Ray's processes use)."""
    return {PREEMPTION_WATCHER: os.environ.get(PREEMPTION_WATCHER, "0")}


STATE_TRACKING = "RAY_TRAIN_ENABLE_STATE_TRACKING"


def cluster_only_variables() -> dict[str, str]:
    """Settings for a cluster this process joins (a user's own value wins).

    Ray Train's record of its runs (a detached actor on the head; also what the dashboard's Train
    page shows) names each run's controller: with it, the resource request of a run whose
    controller died (a stopped Tune trial) is withdrawn at once (pipeline.leftovers), not when it
    goes unrenewed. A local instance lives as long as the stage, and its 2 cores are spared the actor."""
    return {STATE_TRACKING: os.environ.get(STATE_TRACKING, "1")}


def _free_local_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def workers_may_be_remote() -> bool:
    """True when the cluster has a node other than the driver's: its workers see none of our files."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return any(node["Alive"] and node["NodeID"] != here for node in ray.nodes())


def check_remote_requirements(env: Environment) -> None:
    """Workers on other nodes need shared storage and a tracking server: refuse before training."""
    if not env.storage_root:
        raise ClusterError("HMSA_STORAGE is not set, but this Ray cluster has other nodes, whose workers cannot "
                           "read this machine's files: set HMSA_STORAGE=s3://bucket/prefix (or a shared path)")
    if env.tracking_is_local:
        raise ClusterError(f"MLFLOW_TRACKING_URI = {env.tracking_uri}: workers on other nodes cannot write to this "
                           "machine's tracking store; set MLFLOW_TRACKING_URI to an MLflow server (http://...)")


# --- data --------------------------------------------------------------------------------------

def place_pyramid(env: Environment, pyramid_dir: str, remote: bool) -> str:
    """The pyramid URI workers read: the local directory when every worker is on this machine, else
    its copy in shared storage under its content hash (published once, never overwritten)."""
    if not remote:
        return str(Path(pyramid_dir).resolve())
    target = join(env.pyramid_root(), content_hash(pyramid_dir))
    published = env.storage(target).publish_once(Path(pyramid_dir), target)
    print(f"pyramid {'published to' if published else 'already in shared storage at'} {target}")
    return target


# --- pre-flight on every node ------------------------------------------------------------------

def _node_checks(pyramid_uri: str, checkpoint_root: str, tracking_uri: str) -> dict:
    """Runs on one node: read the manifest, write storage, reach the tracking server."""
    import ray

    env = Environment.from_environ()
    problems = []
    try:
        env.storage(pyramid_uri, quick=True).read_bytes(join(pyramid_uri, "manifest.json"))
    except Exception as err:  # noqa: BLE001
        problems.append(f"cannot read the pyramid at {pyramid_uri} ({str(err).splitlines()[0]}); "
                        "check HMSA_STORAGE and the AWS_* variables")
    problem = storage_problem(env, checkpoint_root)
    if problem:
        problems.append(f"HMSA_STORAGE = {checkpoint_root}: {problem}")
    if tracking_uri.startswith(("http://", "https://")):
        problem = tracking_problem(tracking_uri)
        if problem:
            problems.append(f"MLFLOW_TRACKING_URI = {tracking_uri}: {problem}")
    context = ray.get_runtime_context()
    return {"node": context.get_node_id(), "ip": ray.util.get_node_ip_address(), "problems": problems}


def preflight(pyramid_uri: str, checkpoint_root: str, tracking_uri: str) -> int:
    """Run the checks on every alive node; raises naming the node and setting that fail."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    check = ray.remote(num_cpus=0, max_retries=0)(_node_checks)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    pending = {check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
               .remote(pyramid_uri, checkpoint_root, tracking_uri): n for n in nodes}
    ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=PREFLIGHT_TIMEOUT_S)
    failures = []
    for ref in late:
        node = pending[ref]
        failures.append(f"node {node['NodeManagerAddress']} ({node['NodeID'][:12]}): no answer to the pre-flight "
                        f"check in {PREFLIGHT_TIMEOUT_S} s (can it install the job's runtime_env?)")
        ray.cancel(ref, force=True)
    for ref in ready:
        node = pending[ref]
        try:
            answer = ray.get(ref)
        except Exception as err:  # noqa: BLE001 - the task itself failed: say why, in one line
            cause = getattr(err, "cause", None) or err
            failures.append(f"node {node['NodeManagerAddress']} ({node['NodeID'][:12]}): the check could not run "
                            f"({type(cause).__name__}: {str(cause).strip().splitlines()[-1]})")
            continue
        failures += [f"node {answer['ip']} ({answer['node'][:12]}): {p}" for p in answer["problems"]]
    if failures:
        raise ClusterError("pre-flight failed on " + "; ".join(failures) + ". Nodes of a cluster use their own "
                           "credentials (a Secret or an instance role, as in infra/kuberay), never the driver's")
    return len(nodes)


# --- identity of a run -------------------------------------------------------------------------

def code_fingerprint() -> str:
    """SHA-256 of the project's Python code, so a code change starts a new run."""
    digest = hashlib.sha256()
    for directory in CODE_DIRS:
        for path in sorted((REPO_ROOT / directory).rglob("*.py")):
            digest.update(path.relative_to(REPO_ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def run_key(cfg: PipelineConfig, dataset_fingerprint: str) -> str:
    """A stable id for 'this training': same code, config and data, same run (so a restart resumes
    it and a finished one is reused); anything that changes what is computed gives a new id. Where
    the results are written, fault tolerance and loader processes do not (OPERATIONAL_KEYS), and
    methods that train alike (`training_method`) share it."""
    from components.config import result_settings
    from components.models.build import training_method

    model = cfg.model.model_copy(update={"method": training_method(cfg.model)}).model_dump(mode="json")
    relevant = {"model": model, "train": result_settings(cfg, "train"),
                "loader": result_settings(cfg, "loader"), "data": dataset_fingerprint,
                "workers": cfg.ray.model_dump(mode="json")["num_workers"], "code": code_fingerprint()}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]
