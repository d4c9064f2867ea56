"""What ended runs leave on a Ray cluster, found and freed, so that the next run starts at once.

Two kinds of leftovers held the resources of a cluster after the run that made them had ended:

- placement groups (a worker group's CPUs) that Ray never frees: `free_leaked_placement_groups`;
- resource requests to the autoscaling coordinator, through which Ray Train reserves a run's worker
  resources: an elastic run starts with (and grows to) only what no other request reserves. A run
  that ends normally withdraws its request; one whose controller is killed (a Tune trial that is
  stopped, a driver killed) leaves it reserved for 180 s, and the next elastic trial waited that
  long with the CPUs idle: `free_stale_resource_requests` withdraws it as soon as the controller is
  dead.

Every stage that joins a cluster frees both first (`free_leftovers`), and `LeftoverReaper` frees them
every few seconds while a search or a training runs. Both read the GCS directly, so they work on a
cluster started without the dashboard.
"""

from __future__ import annotations

import threading

NIL_ACTOR_ID = "ff" * 16  # a placement group made by a driver, not by an actor

# A live Ray Train controller renews its request every 20 s (AUTOSCALING_REQUESTS_INTERVAL_S in
# ray.train.v2's autoscaling_coordinator_client) and asks for 180 s each time; one not renewed for
# longer than this belongs to a controller that is gone.
STALE_REQUEST_AFTER_S = 25.0
REQUEST_LIFETIME_S = 180.0
COORDINATOR = ("AutoscalingCoordinator", "AutoscalingCoordinator")  # (name, namespace) of Ray's actor


def free_leaked_placement_groups() -> int:
    """Remove the placement groups Ray should have freed and did not; returns how many.

    Ray frees a placement group when its creator job ends or its creator actor dies, but only the
    groups it knows of at that moment. A Ray Train controller that asks for its worker group's
    placement group while it is being killed leaves one behind: the request arrives a moment after
    the event Ray frees on, and the group stays CREATED for ever, holding its CPUs while every later
    training waits for them. Two ways to get there: a driver killed while its training starts (the
    job ends), and a Tune trial that is stopped (early stopping, or its last report) while its
    controller, seeing its worker gone, starts a new worker group (the controller dies; the job
    lives on). A group whose creator job has ended or whose creator actor is dead, with no live actor
    in it, serves nobody; detached groups are left alone.

    Ray's public table of placement groups says neither who made a group nor whether it is
    detached; the GCS record (the protobuf behind that table) does."""
    import ray
    from ray._private.state import state as global_state
    from ray._raylet import PlacementGroupID
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup

    record = gcs_pb2.PlacementGroupTableData
    alive_states = {record.PENDING, record.PREPARED, record.CREATED, record.RESCHEDULING}
    ended_jobs = {job["JobID"] for job in global_state.job_table() if job["IsDead"]}
    gcs = global_state._connect_and_get_accessor()
    actors = _actor_records()
    dead = gcs_pb2.ActorTableData.DEAD
    dead_actors = {actor.actor_id.hex() for actor in actors if actor.state == dead}
    in_use = {actor.placement_group_id.hex() for actor in actors if actor.state != dead}
    freed = 0
    for raw in gcs.get_placement_group_table():
        group = record.FromString(raw)
        group_id, creator = group.placement_group_id.hex(), group.creator_actor_id.hex()
        orphaned = group.creator_job_id.hex() in ended_jobs or (creator != NIL_ACTOR_ID and creator in dead_actors)
        if group.state not in alive_states or group.is_detached or group_id in in_use or not orphaned:
            continue
        try:
            ray.util.remove_placement_group(PlacementGroup(PlacementGroupID(group.placement_group_id)))
        except Exception as err:  # noqa: BLE001  (Ray may be removing it already: go on with the rest)
            print(f"could not remove placement group {group_id}: {err}")
            continue
        freed += 1
    return freed


def _withdraw_requests(coordinator, ended: set[str], stale_after_s: float, lifetime_s: float) -> list[str]:
    """Runs inside Ray's autoscaling coordinator actor (`__ray_call__`): withdraws the Ray Train
    requests of `ended` requesters and those last renewed more than `stale_after_s` ago; returns
    their requesters."""
    now = coordinator._get_current_time()
    with coordinator._lock:
        withdrawn = [requester for requester, request in coordinator._ongoing_reqs.items()
                     if requester.startswith("train-") and (
                         requester in ended or now - (request.expiration_time - lifetime_s) > stale_after_s)]
    for requester in withdrawn:
        coordinator.cancel_request(requester)
    return withdrawn


def _requesters_of_ended_runs(dead_actors: set[str]) -> set[str]:
    """The coordinator's names (`train-<run id>`) for the Ray Train runs whose controller is dead,
    from Ray Train's own record of its runs (none recorded: an empty set)."""
    import ray
    from ray.train.v2._internal.state.state_actor import get_state_actor

    records = get_state_actor()
    if records is None:
        return set()
    runs = ray.get(records.get_train_runs.remote(), timeout=30)
    return {f"train-{run_id}" for run_id, run in runs.items() if run.controller_actor_id in dead_actors}


def free_stale_resource_requests(stale_after_s: float = STALE_REQUEST_AFTER_S) -> int:
    """Withdraw the resource reservations of Ray Train runs whose controller is gone; returns how many.

    The coordinator says neither who made a request nor whether its maker lives. Ray Train's record
    of its runs names each run's controller: a request of a run whose controller is dead is withdrawn
    at once. A live controller renews its request every 20 s: one not renewed for `stale_after_s`
    (a run Ray Train did not record) is withdrawn too (a live controller that was merely late renews
    it again, and nothing else changes for it)."""
    import ray

    try:
        coordinator = ray.get_actor(*COORDINATOR)
    except ValueError:  # no Ray Train run has asked for resources on this cluster yet
        return 0
    ended = _requesters_of_ended_runs(_dead_actors())
    withdrawn = ray.get(coordinator.__ray_call__.remote(_withdraw_requests, ended, stale_after_s,
                                                        REQUEST_LIFETIME_S), timeout=30)
    return len(withdrawn)


def _actor_records() -> list:
    """The GCS records of every actor of the cluster (state, placement group, ...)."""
    from ray._private.state import state as global_state
    from ray.core.generated import gcs_pb2

    gcs = global_state._connect_and_get_accessor()
    return [gcs_pb2.ActorTableData.FromString(raw) for raw in gcs.get_actor_table(None, None)]


def _dead_actors() -> set[str]:
    from ray.core.generated import gcs_pb2

    return {actor.actor_id.hex() for actor in _actor_records() if actor.state == gcs_pb2.ActorTableData.DEAD}


def free_leftovers() -> tuple[int, int]:
    """Free both kinds of leftovers: (placement groups, resource requests) freed."""
    return free_leaked_placement_groups(), free_stale_resource_requests()


def describe(groups: int, requests: int) -> str:
    freed = [f"{count} {what}" for count, what in ((groups, "placement group(s)"), (requests, "resource request(s)"))
             if count]
    return f"freed {' and '.join(freed)} that ended runs left reserved"


class LeftoverReaper:
    """Frees leftovers (`free_leftovers`) every `interval_s` seconds in a background thread while a
    search or a training runs: Tune stops trials while their training runs, and what one trial
    leaves would otherwise hold the resources the next trials wait for, or keep an elastic run from
    growing. Use as a context manager; best effort (a failed look is printed once, the run goes on)."""

    def __init__(self, interval_s: float = 5.0):
        self.interval_s = interval_s
        self.groups = self.requests = 0  # freed so far
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leftover-reaper", daemon=True)

    def __enter__(self) -> LeftoverReaper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        complained = False
        while not self._stop.wait(self.interval_s):
            try:
                groups, requests = free_leftovers()
            except Exception as err:  # noqa: BLE001  (the GCS may be briefly unreachable)
                if not complained:
                    print(f"could not look for leftovers of ended runs: {err}")
                complained = True
                continue
            if groups or requests:
                self.groups, self.requests = self.groups + groups, self.requests + requests
                print(describe(groups, requests))
