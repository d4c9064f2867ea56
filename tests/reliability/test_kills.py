"""SIGKILL of the stages that follow training (`evaluate`, `eval-scales`, `register`, one `ablation`
method): whatever moment the kill lands, the earlier outputs stay whole, nothing in the registry or
the tracking store is duplicated or left half-made, and a rerun finishes the work.

The kill moments are fractions of the stage's own measured duration on this machine, so they fall
inside the stage's work (not its imports) however fast or slow the machine is."""

from __future__ import annotations

import csv
import json
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.services import python_env
from tests.test_register_predict import _no_leaked_tracking_uri, server  # noqa: F401  (fixtures)
from tests.train_helpers import run_stage, stage_command, stage_env, tiny_pyramid, write_params

pytestmark = pytest.mark.integration

KILL_FRACTIONS = (0.6, 0.75, 0.85, 0.93)


def timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return time.perf_counter() - start


def kill_after(command: list[str], env: dict, seconds: float) -> bool:
    """Start `command`, SIGKILL it after `seconds`; True when it was still running (the kill landed)."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=60)
        return True


def served_models(client, run_id: str) -> list:
    """The models named `served` logged to a training run (each candidate's run serves one set)."""
    experiment = client.get_run(run_id).info.experiment_id
    return client.search_logged_models([experiment],
                                       filter_string=f"source_run_id = '{run_id}' AND name = 'served'")


@pytest.mark.timeout(900)
def test_sigkill_of_register_leaves_no_duplicate_and_no_half_made_version(tmp_path, server):
    from tests.test_register_predict import trained_candidate

    client = mlflow.MlflowClient(server.uri)
    env = python_env(MLFLOW_TRACKING_URI=server.uri)
    timed(stage_command("register", trained_candidate(tmp_path / "first", server, seed=1, miou=0.25)), env)
    # timed on the second registration: the first one also creates the registered model
    duration = timed(stage_command("register", trained_candidate(tmp_path / "second", server, seed=2, miou=0.30)),
                     env)
    print(f"register took {duration:.1f} s")
    landed = 0
    for n, fraction in enumerate(KILL_FRACTIONS):
        params = trained_candidate(tmp_path / f"c{n}", server, seed=10 + n, miou=0.35 + 0.05 * n)
        landed += kill_after(stage_command("register", params), env, fraction * duration)
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
    assert landed >= 2, f"only {landed} of {len(KILL_FRACTIONS)} kills landed before the stage ended"
    every = client.search_model_versions("name = 'hmsa'")
    assert len(every) == 2 + len(KILL_FRACTIONS)  # no version left behind by a killed run


@pytest.mark.timeout(900)
def test_sigkill_of_eval_scales_keeps_whole_files(tmp_path, ray_head):
    from components.models import build_model, save_model
    from tests.conftest import tiny_model_config

    data = tiny_pyramid(tmp_path / "data")
    cfg = tiny_model_config(num_classes=19)
    save_model(build_model(cfg).eval(), cfg, tmp_path / "model")
    params = write_params(tmp_path, data, evaluate={"model": str(tmp_path / "model")})
    env = stage_env(params, **ray_head.client_env())
    timed(stage_command("eval_scales", params), env)  # the first run also ships the code to the cluster
    duration = timed(stage_command("eval_scales", params), env)
    out = tmp_path / "tune"
    before = {name: (out / name).read_bytes() for name in ("eval_scales.csv", "eval_scales.yaml")}
    landed = sum(kill_after(stage_command("eval_scales", params), env, f * duration) for f in KILL_FRACTIONS)
    assert landed >= 2
    for name, content in before.items():  # each file whole: the earlier one or a complete new one
        text = (out / name).read_text()
        assert text.endswith("\n") and (yaml.safe_load(text) if name.endswith("yaml")
                                        else len(text.splitlines()) == len(content.splitlines()))
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temporary left
    assert run_stage("eval_scales", params, **ray_head.client_env()).returncode == 0
    assert yaml.safe_load((out / "eval_scales.yaml").read_text())["recommended"]["name"] in \
        [row[0] for row in csv.reader((out / "eval_scales.csv").read_text().splitlines()[1:])]


@pytest.mark.timeout(1200)
def test_sigkill_of_an_ablation_method_resumes_at_the_killed_seed(tmp_path, ray_head):
    """Killed while training its second seed, the rerun keeps the first seed's finished training
    (no second MLflow run for it) and ends with every seed's result."""
    data = tiny_pyramid(tmp_path / "data")
    # 2-CPU workers on the 2-CPU cluster: one training at a time (with room, seeds run side by side)
    params = write_params(tmp_path, data, ray={"num_workers": 1, "cpus_per_worker": 2}, ablation={
        "epochs": 6, "crop_size": [64, 64], "seeds": [0, 1], "bootstrap_rounds": 200,
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
    timed(stage_command("evaluate", params), env)
    duration = timed(stage_command("evaluate", params), env)  # the second run: as the kills see it
    before = snapshot(out)
    landed = 0
    for fraction in KILL_FRACTIONS:
        landed += kill_after(stage_command("evaluate", params), env, fraction * duration)
        now = snapshot(out)  # the earlier folder, or (a kill after the exchange) a complete new one
        assert now == before or (sorted(now) == sorted(before) and json.loads((out / "metrics.json").read_text()))
    assert landed >= 2
    assert run_stage("evaluate", params, **ray_head.client_env()).returncode == 0
    assert sorted(snapshot(out)) == sorted(before)
    assert sorted(p.name for p in out.parent.iterdir()) == ["eval"]  # no temporary of a killed run is left
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("hmsa").experiment_id],
                              filter_string="tags.stage = 'evaluate'")
    assert [r.info.status for r in runs] == ["FINISHED"]
