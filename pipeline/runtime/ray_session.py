"""Joining Ray: the cluster of RAY_ADDRESS, with the code this checkout holds and the variables
workers need, or a local instance of this stage's own; and the settings of Ray's own processes.

A worker node shares nothing with the driver but the network (DESIGN section 6): on a cluster the job
carries its code as a runtime_env working_dir, never whatever copy a node's image happens to have.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from components.redact import redact
from pipeline.runtime.common import log_variables, verbose
from pipeline.runtime.environment import Environment
from pipeline.runtime.errors import ClusterError
from pipeline.runtime.ports import free_local_port

REPO_ROOT = Path(__file__).resolve().parents[2]
# The code DVC hashes: a change here is a new run (never a resume of the old one).
CODE_DIRS = ("components", "pipeline")
# Never shipped to workers: environments, data and outputs (Ray also honours .gitignore). Patterns
# are gitignore-style: the leading slash anchors them at the root (`data` alone would also drop
# components/data).
WORKING_DIR_EXCLUDES = ["/.git", "/.venv", "/.dvc/cache", "/.dvc/tmp", "/data", "/models", "/results",
                        "/ray_results", "/mlruns", "/mlartifacts", "*.db", "/.local-stack", "__pycache__"]


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


def connect(env: Environment, trains: bool = True) -> str:
    """Join the cluster of RAY_ADDRESS, or start a local Ray; returns a description for the log.

    On a cluster the job carries the code this checkout holds (what DVC hashed) and the variables
    workers need; workers never run whatever copy their image happens to have. `trains`: the job
    runs Ray Train (train, tune, the ablation's trainings); a local Ray for a job of plain tasks
    (evaluation) starts without the dashboard's modules, which only Ray Train's placement-group
    cleaner needs here (their State API), and which cost a 2-core machine about 3 of the 10 CPU-s
    that a local instance takes to start, run a task and stop."""
    import ray

    if ray.is_initialized():
        return "the Ray instance already running in this process"
    if env.ray_address:
        _check_reachable(env.ray_address)
        os.environ.update(cluster_only_variables())  # read where a run starts: here, or in a Tune trial
        runtime_env = {"working_dir": str(REPO_ROOT), "excludes": WORKING_DIR_EXCLUDES,
                       "env_vars": {**env.worker_variables(), **train_controller_variables(),
                                    **cluster_only_variables(), **log_variables()}}
        ray.init(address=env.ray_address, runtime_env=runtime_env, log_to_driver=True, logging_level=_ray_log_level())
        if not verbose():
            _drop_from_driver_log(KNOWN_RAY_NOISE)
        return f"the Ray cluster at {redact(env.ray_address)}"
    if not verbose():
        # Ray turns token authentication on for a local instance and says so in a warning on every
        # start; this one is the stage's own, on loopback, and ends with it.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # A local instance listens on loopback only: nothing outside this machine needs to reach it.
    os.environ.update(local_only_variables())  # the local Ray's processes inherit them
    if not trains:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level=_ray_log_level())
        return "a local Ray instance"
    # Its processes inherit RAY_API_SERVER_ADDRESS, so Ray Train's placement-group cleaner queries
    # this instance's State API even when another Ray runs on the machine (scanning for one, it
    # would fail to choose and never free a stopped Tune trial's workers).
    dashboard = free_local_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
    os.environ.update(train_controller_variables())  # the local Ray's processes inherit them
    ray.init(_node_ip_address="127.0.0.1", dashboard_port=dashboard, logging_level=_ray_log_level())
    return "a local Ray instance"


def _ray_log_level() -> int:
    """The driver's `ray` logger: its INFO lines (the instance started or joined, with the dashboard's
    address) only when verbose; the stage says itself where it runs."""
    return logging.INFO if verbose() else logging.WARNING


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
PRESTART_WORKERS = "RAY_prestart_worker_first_driver"


def local_only_variables() -> dict[str, str]:
    """Settings for a local Ray instance only (a user's own value wins).

    Ray Train starts a preemption watcher per run, an actor that polls for nodes being drained (an
    autoscaler or a spot reclaim). Nothing drains the node of an instance this process started, and
    on a 2-core machine every process of Ray's that wakes up takes time from the training threads
    (benchmarks.orchestration shows the cores Ray's processes use).

    Ray also starts one idle worker process per CPU when the first driver connects, ahead of any
    work. A stage's own instance has one driver, and its work (the Train controller and workers,
    evaluation tasks) starts the processes it needs as it comes; the ones started ahead and never
    used cost a 2-core machine about 1 CPU-s each per stage."""
    return {PREEMPTION_WATCHER: os.environ.get(PREEMPTION_WATCHER, "0"),
            PRESTART_WORKERS: os.environ.get(PRESTART_WORKERS, "0")}


STATE_TRACKING = "RAY_TRAIN_ENABLE_STATE_TRACKING"


def cluster_only_variables() -> dict[str, str]:
    """Settings for a cluster this process joins (a user's own value wins).

    Ray Train's record of its runs (a detached actor on the head; also what the dashboard's Train
    page shows) names each run's controller: with it, the resource request of a run whose
    controller died (a stopped Tune trial) is withdrawn at once (pipeline.runtime.leftovers), not when it
    goes unrenewed. A local instance lives as long as the stage, and its 2 cores are spared the actor."""
    return {STATE_TRACKING: os.environ.get(STATE_TRACKING, "1")}
