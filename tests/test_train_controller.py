"""Ray Train's controller polls its workers often enough that short epochs are not stretched, and
a local run starts none of the helpers that only a cluster needs.

The controller takes a worker's report when it polls (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s
by Ray's default) and a worker's next report waits until then: the ablation's 0.9 s epochs took
2.0 s. The pipeline sets a short interval for every process of its job, local or on a cluster."""

import json
import subprocess
import sys

import pytest

from pipeline.runtime.ray_session import TRAIN_POLL_INTERVAL_S
from tests.services import RayHead, python_env

pytestmark = pytest.mark.integration

# Joins Ray as a stage does, then reads the variable in a Ray worker process of the job.
READ_IN_A_WORKER = """
import json, os, ray
from pipeline.runtime import ray_session
from pipeline.runtime.environment import Environment
ray_session.connect(Environment.from_environ())
seen = ray.get(ray.remote(num_cpus=0)(lambda: os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")).remote())
print(json.dumps(seen))
"""


def seen_by_a_worker(tmp_path, **env) -> str | None:
    done = subprocess.run([sys.executable, "-c", READ_IN_A_WORKER], capture_output=True, text=True, timeout=300,
                          env=python_env(HMSA_STORAGE=str(tmp_path / "store"), **env))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_joined_cluster_polls_train_workers_often_unless_the_user_says_otherwise(tmp_path):
    head = RayHead(num_cpus=1)
    try:
        assert seen_by_a_worker(tmp_path, **head.client_env()) == TRAIN_POLL_INTERVAL_S
        assert seen_by_a_worker(tmp_path, RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="1.5", **head.client_env()) == "1.5"
    finally:
        head.stop()


# Two fits on the local Ray a stage starts: as configured, then with the user's own setting. Each
# training loop lists the live actors of the job for a few seconds (Ray Train starts its helpers
# next to the first steps), and the poll interval its worker process sees, into a file of the
# driver's disk (one machine). Where the watcher is asked for, the listing goes on until it shows
# (at most 120 s): on a busy machine Ray Train started it after the first 6 s.
ACTORS_DURING_TRAINING = """
import json, os, sys, tempfile
import ray.train
from ray.train.torch import TorchTrainer
from pipeline.runtime import ray_session
from pipeline.runtime.environment import Environment
ray_session.connect(Environment.from_environ())

def loop(config):
    import os, time
    from ray.util.state import list_actors
    seen, start = set(), time.monotonic()
    while time.monotonic() - start < (120 if config["asked"] else 6):
        seen |= {actor.class_name for actor in list_actors(filters=[("state", "=", "ALIVE")])}
        if config["asked"] and "PreemptionWatcher" in seen:
            break
        time.sleep(0.5)
    with open(config["out"], "w") as out:
        json.dump({"actors": sorted(seen), "poll": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")}, out)

seen = []
for setting in (None, "1"):
    if setting:
        os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = setting
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "actors.json")
        TorchTrainer(loop, train_loop_config={"out": out, "asked": setting is not None},
                     scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                     run_config=ray.train.RunConfig(storage_path=tmp, name="actors")).fit()
        seen.append(json.load(open(out)))
print(json.dumps(seen))
"""


def test_a_local_ray_polls_often_and_runs_no_preemption_watcher_unless_the_user_asks(tmp_path):
    """A local instance's Train workers are polled often. Nothing drains its node, so Ray Train's
    preemption watcher (an actor polling for drained nodes, one more process taking time from
    training on a small machine) is not started; a user who sets RAY_TRAIN_ENABLE_PREEMPTION_WATCHER
    gets what they set."""
    done = subprocess.run([sys.executable, "-c", ACTORS_DURING_TRAINING], capture_output=True, text=True, check=False,
                          timeout=600, env=python_env(RAY_ADDRESS="", HMSA_STORAGE=str(tmp_path / "store")))
    assert done.returncode == 0, done.stderr[-3000:]
    as_configured, as_the_user_asks = json.loads(done.stdout.strip().splitlines()[-1])
    assert as_configured["poll"] == TRAIN_POLL_INTERVAL_S
    assert "RayTrainWorker" in as_configured["actors"] and "TrainController" in as_configured["actors"]
    assert "PreemptionWatcher" not in as_configured["actors"]
    assert "PreemptionWatcher" in as_the_user_asks["actors"]


# Joins Ray as a stage does, for a job that trains or one of plain tasks, runs a task (or, with
# "idle", waits as long as a task takes here), and lists the Ray processes the driver started (a
# local instance's are its children).
RAY_PROCESSES = """
import json, os, sys, time, ray
from pathlib import Path
from pipeline.runtime import ray_session
from pipeline.runtime.environment import Environment
ray_session.connect(Environment.from_environ(), trains=sys.argv[1] == "trains")
if sys.argv[2:] == ["idle"]:
    time.sleep(3)
else:
    assert ray.get(ray.remote(num_cpus=1)(lambda: 1).remote()) == 1
parents = {}
for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
        parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        pass
ours, found = {os.getpid()}, True
while found:
    found = {pid for pid, parent in parents.items() if parent in ours} - ours
    ours |= found
commands = []
for pid in ours - {os.getpid()}:
    try:
        commands.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\\0", b" ").decode())
    except OSError:
        pass  # ended since
print(json.dumps(commands))
"""


def local_ray_processes(tmp_path, job: str, idle: bool = False) -> list[str]:
    mode = ["idle"] if idle else []
    done = subprocess.run([sys.executable, "-c", RAY_PROCESSES, job, *mode], capture_output=True, text=True,
                          timeout=300, env=python_env(RAY_ADDRESS="", HMSA_STORAGE=str(tmp_path / "store")))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_local_ray_starts_its_dashboard_only_for_a_job_that_trains(tmp_path):
    """Ray Train's placement-group cleaner reads the State API, which a module of the dashboard
    serves (each module a process of its own: the state, jobs, metrics, ... heads); a job of plain
    tasks (evaluation) needs none of them, and on 2 cores they cost about 3 of the 10 CPU-s that a
    local instance takes to start, run a task and stop."""
    def dashboard_modules(processes: list[str]) -> list[str]:
        return [p.split()[0] for p in processes if p.startswith("ray-dashboard-")]

    assert "ray-dashboard-StateHead-0" in dashboard_modules(local_ray_processes(tmp_path, "trains"))
    tasks_only = local_ray_processes(tmp_path, "tasks")
    assert any("ray::IDLE" in p for p in tasks_only) and not dashboard_modules(tasks_only), tasks_only


def test_a_local_ray_starts_no_worker_process_ahead_of_work(tmp_path):
    """Ray starts one idle worker process per CPU when its first driver connects; a stage's own
    instance has one driver, and its work starts the processes it needs (the Train controller and
    workers are actors, each a process of its own). The ones started ahead and never used cost about
    1 CPU-s each per stage on 2 cores."""
    def worker(command: str) -> bool:  # titled ray::IDLE once it has started; its script before that
        return command.startswith("ray::IDLE") or any(a.endswith("default_worker.py") for a in command.split()[:2])

    workers = [p for p in local_ray_processes(tmp_path, "trains", idle=True) if worker(p)]
    assert not workers, workers


def test_evaluation_asks_for_a_ray_of_plain_tasks_and_training_for_one_that_trains(tmp_path, monkeypatch):
    """Which local Ray each kind of work asks for (the one above), up to the point where it joins."""
    from components.config import load_config
    from components.models import build_model
    from pipeline.runtime import ray_session
    from pipeline.runtime.eval_workers import evaluate_all
    from pipeline.runtime.training_run import run_training
    from tests.conftest import tiny_model_config
    from tests.train_helpers import tiny_pyramid, write_params

    asked = []

    class Joined(Exception):
        pass

    def connect(env, trains: bool = True) -> str:
        asked.append(trains)
        raise Joined

    monkeypatch.setattr(ray_session, "connect", connect)
    monkeypatch.setenv("HMSA_STORAGE", str(tmp_path / "store"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = load_config(write_params(tmp_path, tiny_pyramid(tmp_path / "data", train_images=2, val_images=1)))
    model_cfg = tiny_model_config(num_classes=cfg.model.num_classes)
    with pytest.raises(Joined):
        evaluate_all(cfg, build_model(model_cfg).eval(), model_cfg, [[1.0]], flip=False)
    with pytest.raises(Joined):
        run_training(cfg)
    assert asked == [False, True]
