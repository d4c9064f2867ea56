"""The rules of waiting for workers (pipeline/runtime/capacity.py), against a scripted cluster: what is up,
what the autoscaler reports each round. tests/test_autoscaling.py runs them on Ray's own autoscaler."""

import time

import pytest

from components.config import RayConfig
from pipeline.runtime import capacity
from pipeline.runtime.capacity import AutoscalerView, NotProvided
from pipeline.runtime.errors import ClusterError


def node(cpus: float = 0, gpus: float = 0, alive: bool = True) -> dict:
    return {"Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}


class Cluster:
    """Nodes that come up after some looks; an autoscaler (or none) that reports a round per look."""

    def __init__(self, nodes=(), autoscaler=True, arrive_after=None, arriving=(), launching=False, sees_after=0):
        self.nodes, self.autoscaler = list(nodes), autoscaler
        self.arrive_after, self.arriving, self.launching = arrive_after, list(arriving), launching
        self.sees_after = sees_after  # looks before the autoscaler's rounds show the request
        self.looks, self.requests, self.withdrawn = 0, [], 0

    def look(self) -> AutoscalerView:
        self.looks += 1
        if self.arrive_after is not None and self.looks > self.arrive_after:
            self.nodes += self.arriving
            self.arriving = []
        requested = [dict(wanted.bundle) for wanted in self.requests] if self.looks > self.sees_after else []
        launching = self.launching and bool(self.arriving) and bool(requested)
        return AutoscalerView(list(self.nodes), time.time() + self.looks if self.autoscaler else None, launching,
                              requested)

    def requester(self, wanted):
        cluster = self

        class Request:
            def renew(self):
                cluster.requests.append(wanted)

            def withdraw(self):
                cluster.withdrawn += 1

        return Request()


@pytest.fixture(autouse=True)
def no_pauses(monkeypatch):
    monkeypatch.setattr(capacity, "POLL_S", 0.0)


def provide(cluster: Cluster, timeout_s: float = 600, **ray) -> tuple[bool, list[str]]:
    said = []
    use_gpu = capacity.provide(RayConfig(**ray), timeout_s, cluster.look, said.append, cluster.requester)
    return use_gpu, said


def test_workers_are_counted_node_by_node():
    bundle = {"CPU": 2.0}
    assert capacity.workers_up(bundle, [node(cpus=3), node(cpus=3)]) == 2  # 6 CPUs, but 3 + 3: two workers
    assert capacity.workers_up(bundle, [node(cpus=4), node(cpus=8, alive=False)]) == 2
    assert capacity.workers_up({"CPU": 1.0, "GPU": 1.0}, [node(cpus=8, gpus=2), node(cpus=8)]) == 2


def test_a_cluster_that_holds_the_workers_is_not_asked():
    cluster = Cluster([node(cpus=2)], autoscaler=False)
    assert provide(cluster, num_workers=2, cpus_per_worker=1) == (False, [])
    assert cluster.requests == []


def test_a_fixed_cluster_too_small_is_one_error_naming_the_settings():
    expected = (r"ray.num_workers = 2 needs 2 worker\(s\) of 2 CPU \(ray.cpus_per_worker = 2\), but the cluster's "
                r"nodes hold 1, and no autoscaler can add nodes")
    with pytest.raises(NotProvided, match=expected):
        provide(Cluster([node(cpus=3)], autoscaler=False), num_workers=2, cpus_per_worker=2, use_gpu=False)


def test_an_empty_autoscaling_cluster_is_asked_and_waited_for():
    cluster = Cluster([node()], arrive_after=3, arriving=[node(cpus=1), node(cpus=1)], launching=True)
    use_gpu, said = provide(cluster, num_workers=2, cpus_per_worker=1, use_gpu=False)
    assert use_gpu is False
    assert said[0] == "waiting for the autoscaler: 2 worker(s) of 1 CPU (0/2 up, 0 s of 600 s)"
    assert said[-1].startswith("the autoscaler provided 2 worker(s) of 1 CPU in ")
    assert cluster.requests[0].bundle == {"CPU": 1.0} and cluster.withdrawn == 1  # asked, then withdrawn


def test_an_elastic_run_asks_for_its_most_and_starts_at_its_fewest():
    cluster = Cluster([node()], arrive_after=2, arriving=[node(cpus=1)], launching=True)
    provide(cluster, num_workers=(1, 3), cpus_per_worker=1, use_gpu=False)
    assert (cluster.requests[0].fewest, cluster.requests[0].most) == (1, 3)


def test_a_request_the_autoscaler_launches_nothing_for_fails_in_a_few_rounds():
    cluster = Cluster([node()])
    with pytest.raises(NotProvided, match="launched no node for them in 3 rounds"):
        provide(cluster, num_workers=1, cpus_per_worker=64, use_gpu=False)
    assert cluster.looks <= 6 and cluster.withdrawn == 1


def test_rounds_before_the_request_reached_the_autoscaler_do_not_count():
    """The coordinator forwards a request on its own ticks: on a busy head the autoscaler ran 6
    rounds before it saw the request, and launched the GPU node in the next. Those rounds are not
    rounds that launched nothing for it."""
    cluster = Cluster([node()], arrive_after=9, arriving=[node(cpus=1, gpus=1)], launching=True, sees_after=6)
    use_gpu, said = provide(cluster, num_workers=1, cpus_per_worker=1, use_gpu="auto")
    assert use_gpu is True and "ray.use_gpu = auto: the autoscaler provided 1 worker(s) of 1 CPU + 1 GPU" in said[-1]


def test_the_wait_is_bounded_by_scale_up_timeout():
    cluster = Cluster([node()], arrive_after=10**9, arriving=[node(cpus=1)], launching=True)  # never arrives
    with pytest.raises(NotProvided, match=r"did not provide them in 0.05 s \(ray.scale_up_timeout_s\)"):
        provide(cluster, timeout_s=0.05, use_gpu=False)
    assert cluster.withdrawn == 1


def test_auto_trains_on_gpus_the_autoscaler_launches():
    cluster = Cluster([node()], arrive_after=2, arriving=[node(cpus=4, gpus=1)], launching=True)
    use_gpu, said = provide(cluster, num_workers=1, cpus_per_worker=1)
    assert use_gpu is True and cluster.requests[0].bundle == {"CPU": 1.0, "GPU": 1.0}
    assert said[-1].startswith("ray.use_gpu = auto: the autoscaler provided 1 worker(s) of 1 CPU + 1 GPU")


def test_auto_trains_on_cpus_when_no_gpu_node_is_launched():
    cluster = Cluster([node(cpus=2)])
    use_gpu, said = provide(cluster, num_workers=1, cpus_per_worker=1)
    assert use_gpu is False
    assert said[-1] == ("ray.use_gpu = auto: no GPU workers: the cluster has none, and the autoscaler launched no "
                        "node for them in 3 rounds (no node type holds such a worker, or the cluster is at its "
                        "maximum size); training on CPUs")


def test_use_gpu_true_without_gpus_or_autoscaler_is_refused():
    with pytest.raises(ClusterError, match="ray.use_gpu = true, but the cluster has no GPU"):
        provide(Cluster([node(cpus=8)], autoscaler=False), use_gpu=True)
