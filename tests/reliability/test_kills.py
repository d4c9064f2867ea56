"""SIGKILL of the stages that follow training (`evaluate`, `eval-scales`, `register`, one `ablation`
method): whatever moment the kill lands, the earlier outputs stay whole, nothing in the registry or
the tracking store is duplicated or left half-made, and a rerun finishes the work.

Each kill lands at a point of the stage's progress that the test sees from outside (its Ray task
running, its temporary output written, a model version created, an alias moved), never at a time:
a busy or slow machine moves when the points come, not whether the kill falls inside the work."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from tests.services import python_env, wait_until
from tests.train_helpers import run_stage, stage_command, stage_env, tiny_pyramid, write_params

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leaked_tracking_uri")]

def kill_when(command: list[str], env: dict, reached: Callable[[], bool], what: str, timeout: float = 600) -> bool:
    """Start `command` and SIGKILL it as soon as `reached()` holds; True when the kill landed (the
    stage was still running). `reached` must stay true once true (a point of progress, "at or past
    X"), so a short step between two polls is not missed: the kill then lands just after it."""
    # stderr to a file, not a pipe: a stage that logs more than a pipe holds would block on it unread
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None and not reached():
                assert time.monotonic() < deadline, f"{command[2]} did not reach '{what}' in {timeout} s"
                time.sleep(0.01)
            if proc.poll() is not None:
                stderr.seek(0)
                assert proc.returncode == 0, stderr.read()[-3000:]
                return False
            proc.kill()
            return True
        finally:
            proc.wait(timeout=60)


def ray_task_running(cluster, function: str) -> bool:
    """A Ray worker process of `cluster` runs `function` as a task now (Ray names the process after it)."""
    return any(args.startswith(f"ray::{function}") for args in cluster.processes().values())


def replaced(path: Path, before: os.stat_result) -> bool:
    """`path` is no longer the file or folder it was (renamed over by a newer one)."""
    try:
        now = path.stat()
    except FileNotFoundError:
        return False
    return (now.st_ino, now.st_mtime_ns) != (before.st_ino, before.st_mtime_ns)


def served_models(client, run_id: str) -> list:
    """The models named `served` logged to a training run (each candidate's run serves one set)."""
    experiment = client.get_run(run_id).info.experiment_id
    return client.search_logged_models([experiment],
                                       filter_string=f"source_run_id = '{run_id}' AND name = 'served'")


def register_points(client, params: Path) -> dict[str, Callable[[], bool]]:
    """Points of one registration's progress, each true from that point on: the served model is
    being logged, its model version exists, the champion alias has moved to it."""
    from mlflow.exceptions import MlflowException

    from components.models.saved import WEIGHTS_FILE

    run_id = json.loads((params.parent / "run.json").read_text())["run_id"]
    experiment = client.get_run(run_id).info.experiment_id
    sha = hashlib.sha256((params.parent / "model" / WEIGHTS_FILE).read_bytes()).hexdigest()

    def versions() -> list:
        return client.search_model_versions(f"name = 'hmsa' AND tags.weights_sha256 = '{sha}'")

    def champion_moved() -> bool:
        try:
            champion = client.get_model_version_by_alias("hmsa", "champion").version
        except MlflowException:
            return False
        return any(v.version == champion for v in versions())

    return {
        "served model logging": lambda: bool(client.search_logged_models(
            [experiment], filter_string=f"source_run_id = '{run_id}' AND name = 'served'")),
        "version created": lambda: bool(versions()),
        "champion moved": champion_moved,
    }


@pytest.mark.timeout(900)
def test_sigkill_of_register_leaves_no_duplicate_and_no_half_made_version(tmp_path, server):
    from tests.test_register_predict import trained_candidate

    client = mlflow.MlflowClient(server.uri)
    env = python_env(MLFLOW_TRACKING_URI=server.uri)
    for n, name in enumerate(("first", "second")):  # a champion to beat, and the registered model exists
        params = trained_candidate(tmp_path / name, server, seed=1 + n, miou=0.25 + 0.05 * n)
        assert subprocess.run(stage_command("register", params), env=env, capture_output=True).returncode == 0
    landed = {}
    points = ("served model logging", "version created", "champion moved")
    for n, point in enumerate(points):
        params = trained_candidate(tmp_path / f"c{n}", server, seed=10 + n, miou=0.35 + 0.05 * n)
        landed[point] = kill_when(stage_command("register", params), env, register_points(client, params)[point],
                                  point)
        done = subprocess.run(stage_command("register", params), capture_output=True, text=True, env=env,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        decision = json.loads((params.parent / "registration.json").read_text())
        sha = client.get_model_version("hmsa", decision["version"]).tags["weights_sha256"]
        versions = client.search_model_versions(f"name = 'hmsa' AND tags.weights_sha256 = '{sha}'")
        assert [v.version for v in versions] == [decision["version"]]  # one version for these weights
        (served,) = served_models(client, decision["run_id"])  # logged once, whole
        assert served.status.value == "READY"
        # each candidate beats the last by 0.05 > min_delta: judged, it is the champion (promoted by
        # this run, or by the killed one when the kill came after the aliases moved)
        assert client.get_model_version_by_alias("hmsa", "champion").version == decision["version"]
        assert decision["aliases"]["champion"] == decision["version"]
    # The first two points leave the stage seconds of work; the last one only its closing calls.
    assert landed["served model logging"] and landed["version created"], landed
    every = client.search_model_versions("name = 'hmsa'")
    assert len(every) == 2 + len(points)  # no version left behind by a killed run


@pytest.mark.timeout(900)
def test_sigkill_of_eval_scales_keeps_whole_files(tmp_path, ray_head):
    from components.models import build_model, save_model
    from tests.conftest import tiny_model_config

    data = tiny_pyramid(tmp_path / "data")
    cfg = tiny_model_config(num_classes=19)
    save_model(build_model(cfg).eval(), cfg, tmp_path / "model")
    params = write_params(tmp_path, data, evaluate={"model": str(tmp_path / "model")})
    env = stage_env(params, **ray_head.client_env())
    assert run_stage("eval_scales", params, **ray_head.client_env()).returncode == 0
    out = tmp_path / "eval_scales"
    before = {name: (out / name).read_bytes() for name in ("table.csv", "recommended.yaml")}
    written = {name: (out / name).stat() for name in before}

    def past(name: str) -> Callable[[], bool]:
        return lambda: replaced(out / name, written[name])

    points = {  # each true from its point on
        "its evaluation task runs": lambda: ray_task_running(ray_head, "_evaluate_task") or past("table.csv")(),
        "its table is replaced": past("table.csv"),
        "its recommendation is replaced": past("recommended.yaml"),
    }
    landed = {}
    for point, reached in points.items():
        landed[point] = kill_when(stage_command("eval_scales", params), env, reached, point)
        wait_until(lambda: not ray_task_running(ray_head, "_evaluate_task"), 60, "the killed run's Ray task to end")
        written = {name: (out / name).stat() for name in before}
    assert landed["its evaluation task runs"] and sum(landed.values()) >= 2, landed
    for name, content in before.items():  # each file whole: the earlier one or a complete new one
        text = (out / name).read_text()
        assert text.endswith("\n") and (yaml.safe_load(text) if name.endswith("yaml")
                                        else len(text.splitlines()) == len(content.splitlines()))
    with np.load(out / "image_matrices.npz") as archive:  # the gate's per-image evidence, whole too
        assert len(archive.files) == len(before["table.csv"].splitlines()) - 1
    # A kill between a temporary's creation and its rename leaves it; the next run removes it.
    assert run_stage("eval_scales", params, **ray_head.client_env()).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, "image_matrices.npz"])
    assert yaml.safe_load((out / "recommended.yaml").read_text())["recommended"]["name"] in \
        [row[0] for row in csv.reader((out / "table.csv").read_text().splitlines()[1:])]


@pytest.mark.timeout(1200)
def test_sigkill_of_an_ablation_method_resumes_at_the_killed_seed(tmp_path, ray_head):
    """Killed while training its second seed, the rerun keeps the first seed's finished training
    (no second MLflow run for it) and ends with every seed's result. With room for one training on
    the cluster, the seeds train one after another (tests/test_e2e_dvc.py: side by side
    where there is room for two)."""
    data = tiny_pyramid(tmp_path / "data")
    # 2-CPU workers on the 2-CPU cluster: one training at a time (with room, seeds run side by side)
    params = write_params(tmp_path, data, ray={"num_workers": 1, "cpus_per_worker": 2}, ablation={
        "epochs": 4, "crop_size": [64, 64], "seeds": [0, 1], "bootstrap_rounds": 200,
        "output_dir": str(tmp_path / "ablation")})
    command = [*stage_command("ablation", params)[:3], "run", "--method", "hierarchical",
               *stage_command("ablation", params)[3:]]
    env = stage_env(params, **ray_head.client_env())
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first_seed = tmp_path / "ablation" / "hierarchical" / "seed-0" / "result.json"

    def second_seed_checkpointed() -> bool:  # each seed is its own Ray Train run with its own folder
        runs = (tmp_path / "store" / "ray").glob("train-*")
        return first_seed.is_file() and sum(any(run.glob("checkpoint_*")) for run in runs) >= 2

    deadline = time.time() + 600
    while time.time() < deadline and not second_seed_checkpointed() and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-3000:]  # killed in the second seed's training
    proc.kill()
    proc.wait(timeout=60)
    kept = first_seed.read_bytes()
    assert not (tmp_path / "ablation" / "hierarchical" / "result.json").exists()

    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "ablation" / "hierarchical" / "result.json").read_text())
    assert [r["seed"] for r in result["seeds"]] == [0, 1] and first_seed.read_bytes() != b""
    assert json.loads(kept)["miou"] == result["seeds"][0]["miou"]  # the same trained model, evaluated again
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hmsa-ablation")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]  # one run per seed, both whole
    (_, first_end), (second_start, _) = sorted((r.info.start_time, r.info.end_time) for r in runs)
    assert first_end <= second_start and "trainings at a time" not in done.stdout  # one after another


@pytest.mark.timeout(900)
def test_sigkill_of_evaluate_keeps_the_earlier_results_and_one_run(tmp_path, ray_head):
    """evaluate replaces its whole output folder at once: after each kill the folder is the
    earlier one, byte for byte; the rerun finishes and the tracking store holds one evaluation run."""
    from components.models import build_model, save_model
    from tests.conftest import tiny_model_config
    from tests.reliability.files import snapshot

    data = tiny_pyramid(tmp_path / "data")
    cfg = tiny_model_config(num_classes=19)
    save_model(build_model(cfg).eval(), cfg, tmp_path / "model")
    out = tmp_path / "results" / "eval"
    params = write_params(tmp_path, data, evaluate={"model": str(tmp_path / "model"), "pictures": 1,
                                                    "output_dir": str(out), "scale_sets": [[1.0], [0.5, 1.0]]})
    env = stage_env(params, **ray_head.client_env())
    assert run_stage("evaluate", params, **ray_head.client_env()).returncode == 0
    before = snapshot(out)
    written, stale = out.stat(), set()

    def temporaries() -> set[str]:
        return {p.name for p in out.parent.iterdir() if p.name.startswith(".eval.tmp-")}

    def writing() -> bool:  # a new temporary output folder exists, or has already replaced the output
        return bool(temporaries() - stale) or replaced(out, written)

    points = {  # each true from its point on; the last leaves the MLflow logging to be killed
        "its evaluation task runs": lambda: ray_task_running(ray_head, "_evaluate_task") or writing(),
        "its output is being written": writing,
        "its output is replaced": lambda: replaced(out, written),
    }
    landed = {}
    for point, reached in points.items():
        landed[point] = kill_when(stage_command("evaluate", params), env, reached, point)
        wait_until(lambda: not ray_task_running(ray_head, "_evaluate_task"), 60, "the killed run's Ray task to end")
        now = snapshot(out)  # the earlier folder, or (a kill after the exchange) a complete new one
        assert now == before or (sorted(now) == sorted(before) and json.loads((out / "metrics.json").read_text()))
        written, stale = out.stat(), temporaries()  # a killed run's temporary is the next run's to remove
    assert all(landed.values()), landed
    assert run_stage("evaluate", params, **ray_head.client_env()).returncode == 0
    assert sorted(snapshot(out)) == sorted(before)
    assert sorted(p.name for p in out.parent.iterdir()) == ["eval"]  # no temporary of a killed run is left
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def evaluation_runs() -> list:
        return client.search_runs([client.get_experiment_by_name("hmsa").experiment_id],
                                  filter_string="tags.stage = 'evaluate'")

    (run,) = evaluation_runs()
    assert run.info.status == "FINISHED"
    # Whether or not a kill above landed while the run was logging, the state it leaves is this one:
    # the evaluation's run RUNNING. The next run of the stage finishes that run, never a duplicate.
    client.update_run(run.info.run_id, status="RUNNING")
    assert run_stage("evaluate", params, **ray_head.client_env()).returncode == 0
    assert [(r.info.run_id, r.info.status) for r in evaluation_runs()] == [(run.info.run_id, "FINISHED")]
