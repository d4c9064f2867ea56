"""The workers a run needs, from the nodes that are up or from the cluster's autoscaler.

A cluster that autoscales (KubeRay's, `ray up`'s) starts with no worker node and launches nodes
when work asks for them. A run sized from what is up at launch would refuse to start there, so the
launch asks the autoscaler for the run's workers and waits for them, saying what it waits for:

    waiting for the autoscaler: 2 worker(s) of 1 CPU + 1 GPU (0/2 up, 40 s of 600 s)

The wait is bounded (`ray.scale_up_timeout_s`), and it ends early, with the reason, when the
autoscaler launches nothing for the request in a few of its rounds that saw it (no node type holds
such a worker, or the cluster is at its maximum size). `ray.use_gpu: auto` means GPU workers when the
cluster has GPUs or its autoscaler launches a node for a GPU worker.

The request goes through Ray's autoscaling coordinator, as Ray Train's own do: the coordinator
merges the requests of every run on the cluster, so none replaces another's. The request is
withdrawn once the workers are up (the training's own request holds them from then on), when the
wait fails, and, if the driver dies, by its expiry.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from components.config import RayConfig
from pipeline.runtime.errors import ClusterError

PROGRESS_EVERY_S = 20.0
POLL_S = 1.0
# Rounds of the autoscaler (one every AUTOSCALER_UPDATE_INTERVAL_S, 5 s by default) after which a
# request it launched nothing for is taken as one it cannot serve.
ROUNDS_WITHOUT_LAUNCH = 3
AUTOSCALER_STATUS_KEY = "__autoscaling_status"  # ray_constants.DEBUG_AUTOSCALING_STATUS


class NotProvided(ClusterError):
    """The cluster does not hold the run's workers and its autoscaler did not add them; `why` says
    what was tried."""

    def __init__(self, wanted: Need, up: int, why: str):
        self.why = why
        super().__init__(_too_small(wanted, up, why))


@dataclass(frozen=True)
class Need:
    """`fewest` workers of `bundle` to start with (an elastic run's minimum), `most` to grow to."""

    fewest: int
    most: int
    bundle: dict[str, float]

    def describe(self) -> str:
        held = " + ".join(f"{amount:g} {name}" for name, amount in self.bundle.items())
        return f"{self.fewest} worker(s) of {held}"


def need(cfg: RayConfig, use_gpu: bool) -> Need:
    bundle = {"CPU": float(cfg.cpus_per_worker)}
    if use_gpu:
        bundle["GPU"] = float(cfg.gpus_per_worker)
    fewest, most = cfg.worker_range
    return Need(fewest, most, bundle)


def trainings_that_fit(cfg: RayConfig, use_gpu: bool) -> int:
    """How many whole trainings (each at its largest size) the cluster holds at once, at least one:
    the trials of a search and the seeds of an ablation method run that many side by side."""
    import ray

    wanted, resources = need(cfg, use_gpu), ray.cluster_resources()
    return max(1, int(min(resources.get(name, 0) // (wanted.most * amount) for name, amount in wanted.bundle.items())))


def workers_up(bundle: dict[str, float], nodes: list[dict]) -> int:
    """Workers of `bundle` the alive nodes hold, counted node by node (a worker never spans two)."""
    count = 0
    for node in nodes:
        if not node.get("Alive"):
            continue
        total = node.get("Resources") or {}
        count += int(min(total.get(name, 0.0) // amount for name, amount in bundle.items()))
    return count


# --- the autoscaler as the driver sees it ------------------------------------------------------

@dataclass(frozen=True)
class AutoscalerView:
    """One look at the cluster: its alive nodes and the autoscaler's latest round (None: no
    autoscaler runs, as on a local Ray or a cluster of fixed nodes)."""

    nodes: list[dict]
    round_time: float | None  # when the autoscaler last reported
    launching: bool  # nodes requested from the cloud and not up yet
    # the bundles of the resource requests the autoscaler saw in that round (request_resources, as
    # the autoscaling coordinator forwards them on its own ticks, some seconds after a request)
    requested: list[dict] = field(default_factory=list)


def look() -> AutoscalerView:
    import ray
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_STATUS_KEY)
    status = json.loads(raw) if raw else {}
    report = status.get("autoscaler_report") or {}
    # A head started without an autoscaling config runs Ray's autoscaler too, on a read-only provider
    # that launches nothing: its node types are the nodes themselves, named "node_<node id>".
    types = report.get("node_type_mapping") or {}
    if all(kind == f"node_{node_id}" for node_id, kind in types.items()):
        return AutoscalerView(ray.nodes(), None, False)
    launching = bool(report.get("pending_launches") or report.get("pending_nodes"))
    demand = (status.get("load_metrics_report") or {}).get("request_demand") or []
    requested = [bundle for bundle, _count in demand]
    return AutoscalerView(ray.nodes(), float(status.get("time", 0.0)), launching, requested)


def _same_bundle(a: dict[str, float], b: dict[str, float]) -> bool:
    def nonzero(bundle: dict[str, float]) -> dict[str, float]:
        return {name: float(amount) for name, amount in bundle.items() if amount}

    return nonzero(a) == nonzero(b)


def autoscales(view: AutoscalerView) -> bool:
    return view.round_time is not None


class Request:
    """The run's request to Ray's autoscaling coordinator, renewed while it waits, withdrawn after."""

    LIFETIME_S = 60.0  # a driver that dies leaves it for at most this long

    def __init__(self, wanted: Need):
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        self.requester = f"hmsa-launch-{os.getpid()}-{time.time_ns()}"
        self.coordinator = get_or_create_autoscaling_coordinator()
        self.bundles = [dict(wanted.bundle) for _ in range(wanted.most)]
        self.renewed = 0.0

    def renew(self) -> None:
        if time.monotonic() - self.renewed > self.LIFETIME_S / 3:
            self.coordinator.request_resources.remote(requester_id=self.requester, resources=self.bundles,
                                                      expire_after_s=self.LIFETIME_S)
            self.renewed = time.monotonic()

    def withdraw(self) -> None:
        import ray

        ray.get(self.coordinator.cancel_request.remote(self.requester))


def wait_for(wanted: Need, timeout_s: float, looker: Callable[[], AutoscalerView] = look,
             say: Callable[[str], None] = print, requester: Callable[[Need], Request] = Request) -> None:
    """Return once the cluster holds `wanted.fewest` workers; raises NotProvided when it cannot.
    (`looker` and `requester` stand for the cluster in tests of the waiting rules.)"""
    view = looker()
    if workers_up(wanted.bundle, view.nodes) >= wanted.fewest:
        return
    if not autoscales(view) or timeout_s == 0:
        raise NotProvided(wanted, workers_up(wanted.bundle, view.nodes), "and no autoscaler can add nodes to it")
    request = requester(wanted)
    start, asked_at = time.monotonic(), time.time()
    # the autoscaler's rounds that saw the request, since it last had a node on the way (a round
    # before the request reached it launched nothing for it, and says nothing about it)
    rounds_seen: set[float] = set()
    last_said = -PROGRESS_EVERY_S
    try:
        while True:
            request.renew()
            view = looker()
            up = workers_up(wanted.bundle, view.nodes)
            if up >= wanted.fewest:
                say(f"the autoscaler provided {wanted.describe()} in {time.monotonic() - start:.0f} s")
                return
            waited = time.monotonic() - start
            if waited >= timeout_s:
                raise NotProvided(wanted, up, f"and the autoscaler did not provide them in {timeout_s:g} s "
                                              "(ray.scale_up_timeout_s)")
            seen = any(_same_bundle(wanted.bundle, bundle) for bundle in view.requested)
            if view.round_time is not None and view.round_time > asked_at and seen:
                rounds_seen.add(view.round_time)
            if view.launching:
                rounds_seen.clear()  # nodes are on their way: wait for them
            elif len(rounds_seen) >= ROUNDS_WITHOUT_LAUNCH:
                raise NotProvided(wanted, up, f"and the autoscaler launched no node for them in {len(rounds_seen)} "
                                              "rounds (no node type holds such a worker, or the cluster is at "
                                              "its maximum size)")
            if waited - last_said >= PROGRESS_EVERY_S:
                say(f"waiting for the autoscaler: {wanted.describe()} ({up}/{wanted.fewest} up, "
                    f"{waited:.0f} s of {timeout_s:g} s)")
                last_said = waited
            time.sleep(POLL_S)
    finally:
        request.withdraw()


def _too_small(wanted: Need, up: int, why: str) -> str:
    settings = " and ".join(f"ray.{key} = {value:g}" for key, value in
                            (("cpus_per_worker", wanted.bundle["CPU"]), ("gpus_per_worker", wanted.bundle.get("GPU")))
                            if value is not None)
    workers = wanted.fewest if wanted.fewest == wanted.most else [wanted.fewest, wanted.most]
    return (f"ray.num_workers = {workers} needs {wanted.describe()} ({settings}), but the cluster's nodes hold {up}, "
            f"{why}: "
            "lower ray.num_workers or what each worker takes, or give the cluster bigger or more nodes")


def provide(cfg: RayConfig, timeout_s: float, looker: Callable[[], AutoscalerView] = look,
            say: Callable[[str], None] = print, requester: Callable[[Need], Request] = Request) -> bool:
    """Make sure the cluster holds the run's workers, asking its autoscaler when it has one;
    returns whether they are GPU workers (`ray.use_gpu`: auto picks GPUs where the cluster has or
    can launch them)."""
    view = looker()
    on_gpus, on_cpus = need(cfg, use_gpu=True), need(cfg, use_gpu=False)
    if cfg.use_gpu is False:
        wait_for(on_cpus, timeout_s, looker, say, requester)
        return False
    gpus_up = workers_up({"GPU": on_gpus.bundle["GPU"]}, view.nodes) > 0
    if cfg.use_gpu is True:
        if not gpus_up and not autoscales(view):
            raise ClusterError("ray.use_gpu = true, but the cluster has no GPU: set ray.use_gpu to auto or false")
        wait_for(on_gpus, timeout_s, looker, say, requester)
        return True
    if gpus_up:
        wait_for(on_gpus, timeout_s, looker, say, requester)
        return True
    if autoscales(view):
        try:
            wait_for(on_gpus, timeout_s, looker, lambda line: say(f"ray.use_gpu = auto: {line}"), requester)
            return True
        except NotProvided as err:
            say(f"ray.use_gpu = auto: no GPU workers: the cluster has none, {err.why}; training on CPUs")
    wait_for(on_cpus, timeout_s, looker, say, requester)
    return False
