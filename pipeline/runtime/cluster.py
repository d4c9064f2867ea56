"""Checking, before training starts, that the run can actually be placed (pipeline.runtime.ray_session
joins the cluster).

A worker node shares nothing with the driver but the network (DESIGN section 6). So when Ray
workers may run on another node, the driver ships the code it runs from (a runtime_env
working_dir) and the variables for storage and tracking, publishes the pyramid to shared storage,
refuses a tracking store only this machine can write, and runs a pre-flight task on every node.
Each check fails in seconds with one line that names the setting to change.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path

from components.config import PipelineConfig
from components.data.pyramid import content_hash
from components.redact import redact
from components.storage import is_s3, join
from pipeline.runtime.environment import Environment
from pipeline.runtime.errors import ClusterError
from pipeline.runtime.ray_session import CODE_DIRS, REPO_ROOT

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
