"""A tiny Ray Tune search end to end: ASHA, nested MLflow runs, best.yaml, resume, Ctrl-C."""

import re
import signal
import subprocess

import mlflow
import pytest
import yaml

from tests.output_checks import project_tracebacks
from tests.services import wait_until
from tests.train_helpers import (
    cpus_held_by_another_job,
    run_on_cluster,
    stage_command,
    stage_env,
    tiny_pyramid,
    tiny_search,
    trial_rows,
    write_params,
)

pytestmark = pytest.mark.integration


RAY_HEAD_CPUS = 2  # for the ray_head fixture of conftest


def search_params(tmp_path, data):
    # One trial at a time (each takes the 2 CPUs), so ASHA compares each trial with the ones before.
    # The first trial learns (lr 0.1); the second barely moves from the initial weights (lr 1e-9), so
    # at the first rung it falls below the first trial and ASHA stops it; the third diverges (lr 1e30:
    # a NaN loss, which a retry meets again: it fails at once, not retried ray.max_failures times).
    return write_params(
        tmp_path, data,
        ray={"cpus_per_worker": 2},
        train={"batch_size": 2},
        tune={"num_samples": 1, "epochs": 3, "steps_per_epoch": None, "grace_period": 1, "reduction_factor": 2,
              "train_scale_sets": {"s05_10": [0.5, 1.0]},
              "search": {"lr": {"grid": [0.1, 1e-9, 1e30]}, "train_scales": {"choice": ["s05_10"]}}},
    )


def controllers_that_logged(output: str, text: str) -> set[str]:
    """Process ids of Ray Train controllers with a line containing `text` in a stage's output."""
    return set(re.findall(r"\(TrainController pid=(\d+)\)[^\n]*" + re.escape(text), output))


@pytest.fixture(scope="module")
def another_ray_on_the_machine():
    """A second Ray instance on the same machine, as a user's machine may have. Ray Train's
    placement-group cleaner used to find the State API by scanning the machine: with two Rays it
    could not choose, a stopped trial's workers were never freed and the next trial (or the resumed
    one) waited for them for ever. It now uses its own cluster's (RAY_API_SERVER_ADDRESS)."""
    from tests.services import RayHead

    other = RayHead(num_cpus=1)
    yield other
    other.stop()


@pytest.mark.timeout(1500)
def test_search_asha_mlflow_best_and_resume(tmp_path, ray_head, another_ray_on_the_machine):
    data = tiny_pyramid(tmp_path / "data", train_images=16)
    params = search_params(tmp_path, data)
    env = stage_env(params, **ray_head.client_env())

    command = stage_command("tune", params)
    # Interrupt the search once the first trial has reported, then run the stage again: it resumes.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    # Killed once a trial has reported and Tune has saved the search's state (what a restore reads).
    store = tmp_path / "store" / "ray"
    wait_until(lambda: any(store.glob("tune-*/*/result.json")) and any(store.glob("tune-*/experiment_state-*.json")),
               300, "a first trial and the search's saved state", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # --verbose: Ray Train's controllers log their failure decisions (RAISE, RETRY) at INFO
    done = run_on_cluster(command, {**env, "HMSA_VERBOSE": "1"}, 900, ray_head)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "resuming the interrupted search" in done.stdout

    rows = trial_rows(tmp_path)
    assert len(rows) == 3 and [float(r["lr"]) for r in rows if int(r["failed"])] == [1e30], rows
    assert all("training loss became" in r["failure"] for r in rows if int(r["failed"])), rows
    # The diverged trial's training ends at once: its controller decides no retry. (Controllers of
    # the killed first run, ended with it, may log a retry of the workers they lose as they go.)
    diverged = controllers_that_logged(done.stdout + done.stderr, "training loss became")
    assert len(diverged) == 1, diverged
    assert not diverged & controllers_that_logged(done.stdout + done.stderr, "[FailurePolicy] RETRY")
    # (Ray's own noise left out of a default log: tests/test_train_ray.py, which runs without --verbose.)
    assert "trying to log an invalid value" not in done.stdout + done.stderr  # numbers only to Tune's loggers
    # One line per trial start and end, not Tune's tables (a status table every 30 s, one per trial).
    for table in ("Trial status:", "started with configuration:", "completed after"):
        assert table not in done.stdout + done.stderr, table
    assert "ended after 3 of 3 epochs, val mIoU " in done.stdout and "(stopped early by ASHA)" in done.stdout
    assert "ended without a trained epoch" in done.stdout  # the diverged trial
    assert sum(int(r["stopped_early"]) for r in rows) >= 1, rows
    assert all(float(r["train_gflops"]) > 0 for r in rows)
    best = yaml.safe_load((tmp_path / "tune" / "best.yaml").read_text())
    assert best["settings"]["lr"] == 0.1 and best["train_scales"] == [0.5, 1.0]

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hmsa")
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'tune'")
    assert len(parents) == 1
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert len(children) == 3  # one per trial, the interrupted trial's run reused on resume
    assert sorted(float(c.data.params["lr"]) for c in children) == [1e-9, 0.1, 1e30]
    # Every trial ends with its real status: the full-budget one FINISHED, those ASHA stopped KILLED,
    # the diverged one FAILED.
    by_status = sorted((c.info.status, float(c.data.params["lr"])) for c in children)
    stopped = sum(int(r["stopped_early"]) for r in rows)
    assert [s for s, _ in by_status].count("KILLED") == stopped and ("FINISHED", 0.1) in by_status, by_status
    assert ("FAILED", 1e30) in by_status, by_status
    assert parents[0].info.status == "FINISHED"

    # The same search again (same code, config and data) is reused, not run again.
    again = run_on_cluster(command, env, 600, ray_head)
    assert again.returncode == 0 and "reusing the finished search" in again.stdout, again.stderr[-3000:]

    # That best.yaml drives the train stage is held by tests/test_e2e_dvc.py, where the stages run as DVC
    # runs them.


def test_ctrl_c_stops_the_search_in_one_line_and_its_trials_as_killed(tmp_path, ray_head):
    """Ray Tune's own Ctrl-C handler stops the search and returns what the trials reached: the stage
    took that for a finished search whose trials had all failed (a traceback, exit 1, the trials'
    MLflow runs left RUNNING). Now it is an interrupt: one line, exit 130, runs KILLED."""
    data = tiny_pyramid(tmp_path / "data", train_images=16)
    params = search_params(tmp_path, data)
    env = stage_env(params, **ray_head.client_env())
    log_path = tmp_path / "stage.log"
    with open(log_path, "w") as log:  # a file: a pipe nobody reads while the test waits would block the stage
        proc = subprocess.Popen(stage_command("tune", params), stdout=log, stderr=subprocess.STDOUT, text=True,
                                env=env)
    store = tmp_path / "store" / "ray"
    wait_until(lambda: any(store.glob("tune-*/*/result.json")), 300, "a first trial's report", proc, log_path)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    output = log_path.read_text()
    assert proc.returncode == 130, output[-3000:]
    assert output.strip().splitlines()[-1].startswith("interrupted: the stage stopped"), output[-3000:]
    assert not project_tracebacks(output) and not (tmp_path / "tune" / "best.yaml").exists()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("hmsa").experiment_id])
    assert runs and {run.info.status for run in runs} == {"KILLED"}, [(r.info.run_name, r.info.status) for r in runs]


@pytest.mark.timeout(900)
def test_more_samples_continue_a_finished_search_and_keep_its_trials(tmp_path, ray_head):
    """tune.num_samples 1 -> 2 trains the one new sample only; the first trial's row and MLflow run
    are kept (a new search would train both again); back to 1, the first trial alone is reused."""
    data = tiny_pyramid(tmp_path / "data", train_images=4, val_images=2)

    def search(samples: int) -> subprocess.CompletedProcess:
        params = write_params(tmp_path, data, ray={"cpus_per_worker": 2}, tune=tiny_search(
            num_samples=samples, search={"lr": {"loguniform": [0.001, 0.1]}, "train_scales": {"choice": ["s05_10"]}}))
        done = run_on_cluster(stage_command("tune", params), stage_env(params, **ray_head.client_env()), 600,
                              ray_head)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        return done

    search(1)
    (first,) = trial_rows(tmp_path)
    more = search(2)
    assert "continuing the finished search of 1 samples" in more.stdout, more.stdout[-2000:]
    rows = trial_rows(tmp_path)
    assert [r["sample"] for r in rows] == ["0", "1"] and rows[0] == first, rows
    assert more.stdout.count(" started: ") == 1  # one new trial
    # Without --verbose, none of Tune's heading (its table, where results are, a TensorBoard command)
    # nor Ray's INFO lines: the trial lines say what happens.
    for chatter in ("Configuration for experiment", "View detailed results", "tensorboard", "Wrote the latest"):
        assert chatter not in more.stdout + more.stderr, chatter
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hmsa")
    (parent,) = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'tune'")
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(float(c.data.params["lr"]) for c in children) == sorted(float(r["lr"]) for r in rows)
    assert all(c.info.status == "FINISHED" for c in children)

    fewer = search(1)
    assert "reusing the finished search" in fewer.stdout and trial_rows(tmp_path) == [first]


@pytest.mark.timeout(600)
def test_a_trial_whose_workers_cannot_be_placed_fails_with_its_cause_and_the_search_goes_on(tmp_path, ray_head):
    """Another job holds every CPU: each trial's workers fail to start ray.max_start_failures + 1
    times, and the trial fails then, its cause named, without Tune's ray.max_failures retries of the
    whole wait; the next trial is tried; with no trial trained, the stage fails in one line."""
    data = tiny_pyramid(tmp_path / "data", train_images=4, val_images=2)
    params = write_params(tmp_path, data, ray={"cpus_per_worker": 2, "max_start_failures": 1, "max_failures": 3},
                          tune=tiny_search(search={"lr": {"grid": [0.01, 0.02]},
                                                   "train_scales": {"choice": ["s05_10"]}}))
    env = stage_env(params, **ray_head.client_env(), RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="3")
    with cpus_held_by_another_job(ray_head):
        done = run_on_cluster(stage_command("tune", params), env, 400, ray_head)
    cause = "the training's workers could not start 2 times"
    assert done.stdout.count(f"failed: {cause}") == 2, (done.stdout + done.stderr)[-4000:]  # each trial once
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(errors) == 1 and "every one of the 2 trials failed" in errors[0], \
        done.stderr[-3000:]
    assert cause in errors[0] and "held by other work" in errors[0], errors
    assert not (tmp_path / "tune" / "best.yaml").exists()
