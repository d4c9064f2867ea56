"""A killed run must not leave the cluster unable to run the next one.

A training killed while it starts can leave a placement group that Ray never frees (see
`pipeline.runtime.leftovers.free_leaked_placement_groups`); it holds its CPUs for ever, and every later
training on that cluster waits for them. Every stage that joins a cluster frees such groups first,
and a search frees them while it runs (its stopped trials leave them)."""

from __future__ import annotations

import pytest

from tests.services import RayHead
from tests.train_helpers import run_on_cluster, stage_command, stage_env, tiny_pyramid, write_params

pytestmark = pytest.mark.integration


@pytest.fixture
def own_cluster():
    """A cluster of its own: a leaked group left behind by a failure here must not stall other tests."""
    head = RayHead(num_cpus=2)
    yield head
    head.stop()


def test_a_stage_frees_the_cpus_a_killed_run_left_reserved(tmp_path, own_cluster):
    from components.models import build_model, save_model
    from tests.conftest import tiny_model_config

    leaked = own_cluster.leak_placement_group(cpus=2)  # every CPU of the cluster
    assert own_cluster.placement_group_states()[leaked] == "CREATED"

    data = tiny_pyramid(tmp_path / "data")
    cfg = tiny_model_config(num_classes=19)
    save_model(build_model(cfg).eval(), cfg, tmp_path / "model")
    params = write_params(tmp_path, data, evaluate={"model": str(tmp_path / "model"), "pictures": 0,
                                                    "output_dir": str(tmp_path / "eval"), "scale_sets": [[1.0]]})
    # Without the cleanup the evaluation's workers wait for the leaked CPUs for ever.
    done = run_on_cluster(stage_command("evaluate", params), stage_env(params, **own_cluster.client_env()),
                          timeout=300, cluster=own_cluster)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "freed 1 placement group(s) that ended runs left reserved" in done.stdout
    assert own_cluster.placement_group_states()[leaked] == "REMOVED"
    assert (tmp_path / "eval" / "metrics.json").is_file()


# A driver of the live job: makes and kills a "controller" actor, holds a group of its own, then
# (once the test has leaked groups for that job and actor) runs the search's reaper until the leaked
# group is gone. A process of its own, as a search driver is.
LIVE_JOB_DRIVER = """
import json, sys, time
import ray
from ray.util.placement_group import placement_group
from pipeline.runtime.leftovers import LeftoverReaper

ray.init(logging_level="ERROR")

@ray.remote(num_cpus=0)
class Controller:
    def ping(self):
        return 1

controller = Controller.remote()
ray.get(controller.ping.remote())
ray.kill(controller)
live = placement_group([{"CPU": 0.5}])  # the driver's own, in use by nobody yet: not a leak
ray.get(live.ready(), timeout=60)
print(json.dumps({"job": ray.get_runtime_context().get_job_id(), "actor": controller._actor_id.hex(),
                  "live": live.id.hex()}), flush=True)
leaked = sys.stdin.readline().strip()
with LeftoverReaper(interval_s=0.5) as reaper:
    deadline = time.monotonic() + 60
    while ray.util.placement_group_table()[leaked]["state"] != "REMOVED" and time.monotonic() < deadline:
        time.sleep(0.5)
print(json.dumps({"freed": reaper.groups}), flush=True)
"""


def test_a_search_frees_what_a_stopped_trials_training_leaked(own_cluster):
    """The leak inside a live job: Tune stops a trial while its Train controller, seeing its worker
    gone, asks for a new worker group; the controller dies, its late request leaves a CREATED group,
    and the next trials wait for its CPUs (seen in a `make repro`: 0.0/2.0 CPU used, 2.0 reserved,
    the next trial's group PENDING). The search's reaper frees it while the search runs; groups of
    live creators and detached groups are kept."""
    import json
    import subprocess
    import sys

    from tests.services import python_env

    driver = subprocess.Popen([sys.executable, "-c", LIVE_JOB_DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=python_env(**own_cluster.client_env()))
    try:
        ids = json.loads(driver.stdout.readline())
        leaked = own_cluster.leak_placement_group(cpus=1, job=ids["job"], actor=ids["actor"])
        detached = own_cluster.leak_placement_group(cpus=0.5, job=ids["job"], actor=ids["actor"], detached=True)
        assert own_cluster.placement_group_states()[leaked] == "CREATED"
        out, err = driver.communicate(leaked + "\n", timeout=180)
    finally:
        driver.kill()
    assert driver.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1]) == {"freed": 1}
    states = own_cluster.placement_group_states()
    assert states[leaked] == "REMOVED"
    assert states[detached] == "CREATED" and states[ids["live"]] in ("CREATED", "REMOVED")  # REMOVED: its job ended


# A driver that asks Ray's autoscaling coordinator for resources as Ray Train's controllers do: a
# request of an ended run (not renewed since), one of a live run (just renewed) and one of Ray Data.
STALE_REQUEST_DRIVER = """
import json, time
import ray
from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
    ResourceRequestPriority, get_or_create_autoscaling_coordinator)
from pipeline.runtime.leftovers import free_stale_resource_requests

ray.init(logging_level="ERROR")
coordinator = get_or_create_autoscaling_coordinator()

def request(requester, cpus, priority=ResourceRequestPriority.HIGH):  # HIGH: Ray Train's
    ray.get(coordinator.request_resources.remote(requester_id=requester, resources=[{"CPU": 1.0}] * cpus,
                                                 expire_after_s=180, priority=priority))

def reserved(requester):
    by_node = ray.get(coordinator.get_reserved_resources.remote(requester, recompute=True))
    return sum(resources.get("CPU", 0) for resources in by_node.values())

request("train-ended", 2)  # every CPU of the cluster
request("data-pipeline", 1, ResourceRequestPriority.LOW)  # not Ray Train's: kept
time.sleep(3)
request("train-new", 2)  # an elastic run that starts now
before = reserved("train-new")
withdrawn = free_stale_resource_requests(stale_after_s=2)
print(json.dumps({"before": before, "after": reserved("train-new"), "withdrawn": withdrawn,
                  "ended": reserved("train-ended"), "data": reserved("data-pipeline")}))
"""


def test_requests_of_ended_runs_are_withdrawn_and_the_next_run_gets_their_resources(own_cluster):
    """An elastic run starts with, and grows to, only what no other request reserves; a run whose
    controller was killed (a stopped trial) kept its reservation for 180 s, and the next elastic
    trial waited that long with the CPUs idle (and a CI run's elastic training started on 1 of 2
    nodes). A request not renewed within its renewal interval is withdrawn; others are kept."""
    import json
    import subprocess
    import sys

    from tests.services import python_env

    done = subprocess.run([sys.executable, "-c", STALE_REQUEST_DRIVER], capture_output=True, text=True, timeout=180,
                          env=python_env(**own_cluster.client_env()))
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    # The ended run's request held both CPUs; withdrawn, they go to the new run.
    assert seen == {"before": 0, "after": 2, "withdrawn": 1, "ended": 0, "data": 0}
    # (Ray Data's request is kept, but reserves nothing while Ray Train's, of higher priority, take all.)



# A driver whose Ray Train run is stopped as a Tune trial's is: its controller is killed while the
# run waits for a worker that cannot be placed (it asks for more CPUs than the cluster has), its
# request to the coordinator still in place. The cleanup then runs with a staleness bound that no
# request reaches in this test: only a dead controller can get a request withdrawn.
DEAD_CONTROLLER_DRIVER = """
import json, os, signal, threading, time
import ray
from ray.core.generated import gcs_pb2
from ray._private.state import state as global_state
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from pipeline.runtime.ray_session import connect
from pipeline.runtime.environment import Environment
from pipeline.runtime.leftovers import COORDINATOR, free_stale_resource_requests

connect(Environment.from_environ())  # joins the cluster as every stage does

def train_requests():
    try:
        coordinator = ray.get_actor(*COORDINATOR)
    except ValueError:
        return []
    return ray.get(coordinator.__ray_call__.remote(
        lambda c: sorted(r for r in c._ongoing_reqs if r.startswith("train-"))))

def controllers(state):
    gcs = global_state._connect_and_get_accessor()
    actors = (gcs_pb2.ActorTableData.FromString(raw) for raw in gcs.get_actor_table(None, None))
    return [a for a in actors if a.class_name == "TrainController" and a.state == state]

def wait_for(check, what):
    deadline = time.monotonic() + 120
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)

trainer = TorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 8}),
                       run_config=RunConfig(storage_path=os.environ["STORE"], name="stopped-trial"))
threading.Thread(target=trainer.fit, daemon=True).start()
wait_for(lambda: train_requests() and controllers(gcs_pb2.ActorTableData.ALIVE), "the run's request")
(controller,) = controllers(gcs_pb2.ActorTableData.ALIVE)
os.kill(controller.pid, signal.SIGKILL)
wait_for(lambda: controllers(gcs_pb2.ActorTableData.DEAD), "the controller's death")
before = train_requests()
withdrawn = free_stale_resource_requests(stale_after_s=3600)
print("RESULT", json.dumps({"before": len(before), "withdrawn": withdrawn, "after": len(train_requests())}),
      flush=True)
"""


def test_the_request_of_a_run_whose_controller_died_is_withdrawn_at_once(tmp_path, own_cluster):
    """A request is withdrawn as soon as its run's controller is dead (Ray Train's record of its
    runs names the controller), not after it goes unrenewed: the next trial of a search starts
    within the reaper's interval, not 25 s later."""
    import json
    import subprocess
    import sys

    from tests.services import python_env

    done = subprocess.run([sys.executable, "-c", DEAD_CONTROLLER_DRIVER], capture_output=True, text=True,
                          timeout=300, env=python_env(**own_cluster.client_env(), STORE=str(tmp_path / "store")))
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = [line.removeprefix("RESULT ") for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert json.loads(result) == {"before": 1, "withdrawn": 1, "after": 0}
