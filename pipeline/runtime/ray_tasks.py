"""Per-sample work of the data stages (`prepare`, `pyramid`) as Ray tasks on the cluster of RAY_ADDRESS.

A task is sent the bytes of its sample's files, read here: a node shares no disk with the driver
(DESIGN section 6). One task per sample keeps a task's memory at one image's whatever the dataset;
a bounded number in flight keeps the driver's, and lets an autoscaler see the demand and add nodes.
Results come back in job order, so what a stage writes does not depend on where the work ran.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator
from typing import Any

# Tasks in flight per CPU of the cluster (at least TASKS_IN_FLIGHT_MIN): enough to keep every core
# busy while results travel back, few enough that the driver holds a bounded number of images.
TASKS_PER_CPU = 2
TASKS_IN_FLIGHT_MIN = 8


def tasks_in_flight(setting: int | str) -> int:
    """A stage's `workers` on a cluster: the tasks submitted at once (auto: TASKS_PER_CPU per CPU the
    cluster has now, at least TASKS_IN_FLIGHT_MIN, so a cluster that starts empty is asked for nodes)."""
    import ray

    if setting != "auto":
        return int(setting)
    return max(TASKS_IN_FLIGHT_MIN, TASKS_PER_CPU * int(ray.cluster_resources().get("CPU", 0)))


def _on_a_node(work: Callable[..., Any], arguments: tuple) -> tuple[Any, str]:
    """A Ray task: `work(*arguments)`, and the node it ran on."""
    import ray

    return work(*arguments), ray.get_runtime_context().get_node_id()


def map_on_ray(work: Callable[..., Any], jobs: list, arguments_of: Callable[[Any], tuple], in_flight: int,
               nodes: set[str]) -> Generator[Any, None, None]:
    """work(*arguments_of(job)) for every job, as Ray tasks of one CPU, yielded in job order; at most
    `in_flight` submitted and not yet taken. `arguments_of` runs here (it reads the files). A task
    lost with its node is run again by Ray; a task's own error is raised here as itself (the
    ValueError that names the file), not as Ray's wrapper with its traceback. `nodes` collects
    the nodes that did the work."""
    import ray

    task = ray.remote(num_cpus=1)(_on_a_node)
    remaining = iter(jobs)
    running: deque = deque()
    try:
        while True:
            while len(running) < in_flight and (job := next(remaining, None)) is not None:
                running.append(task.remote(work, arguments_of(job)))
            if not running:
                return
            try:
                result, node = ray.get(running.popleft())
            except ray.exceptions.RayTaskError as err:
                raise err.cause if isinstance(err.cause, Exception) else err from None
            nodes.add(node)
            yield result
    finally:
        for ref in running:  # stopped early (an error, Ctrl-C): what is still queued is not wanted
            ray.cancel(ref)
