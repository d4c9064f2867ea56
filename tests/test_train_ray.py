"""The train stage on a real local Ray cluster: DDP, fault tolerance, resume, MLflow, bad config."""

import json
import os
import shutil
import signal
import subprocess
import time

import mlflow
import pytest

from components.models import load_saved_model
from tests.output_checks import project_tracebacks
from tests.services import MlflowServer, wait_until
from tests.train_helpers import (
    cpus_held_by_another_job,
    curve_epochs,
    read_metrics,
    run_stage,
    stage_command,
    stage_env,
    tiny_pyramid,
    write_params,
)

pytestmark = pytest.mark.integration


RAY_HEAD_CPUS = 3  # for the ray_head fixture of conftest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_pyramid(tmp_path_factory.mktemp("data"), train_images=12)


def registered_epochs(workdir) -> list[int]:
    """Epochs of the checkpoints Ray Train has registered (a checkpoint directory can exist on
    disk before the controller registers it; only registered ones are restored)."""
    for snapshot in (workdir / "store" / "ray").glob("*/checkpoint_manager_snapshot.json"):
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (json.JSONDecodeError, KeyError):
            return []  # being rewritten
        return sorted(r["metrics"]["epoch"] for r in results)
    return []


def _start_training(tmp_path, data, ray_head, epochs, env=None, **sections):
    params = write_params(tmp_path, data, train={"epochs": epochs, "crop_size": [96, 96], "batch_size": 2},
                          model={"trunk": "resnet18", "decoder_channels": 32, "attention_channels": 32},
                          **sections)
    # The stage's output goes to a file: a pipe nobody reads while the test waits would block it.
    with open(tmp_path / "stage.log", "w") as log:
        proc = subprocess.Popen(stage_command("train", params), stdout=log, stderr=subprocess.STDOUT, text=True,
                                env=stage_env(params, **ray_head.client_env(), **(env or {})))
    wait_until(lambda: len(registered_epochs(tmp_path)) >= 1, 240, "a first registered checkpoint", proc,
               tmp_path / "stage.log")
    return params, proc


def training_worker_pids(cluster) -> list[int]:
    """PIDs of live Ray Train workers of `cluster`: Ray titles each actor process after its class."""
    return [pid for pid, args in cluster.processes().items() if "RayTrainWorker" in args]


def test_a_killed_worker_and_then_a_killed_driver_resume_one_mlflow_run(tmp_path, data, ray_head):
    """A worker dies: the run restarts its workers from the last checkpoint. Then the driver dies:
    the stage run again resumes from the last checkpoint into the same MLflow run. Every epoch is
    trained and logged once, and one model is logged."""
    server = MlflowServer(tmp_path)
    try:
        params, proc = _start_training(tmp_path, data, ray_head, epochs=6, ray={"max_failures": 2},
                                       env={"MLFLOW_TRACKING_URI": server.uri})
        workers = training_worker_pids(ray_head)
        assert workers, "no live training worker to kill"
        os.kill(workers[0], signal.SIGKILL)
        # Once the restarted workers have checkpointed, the driver dies; its Ray actors go with it.
        # (A new worker appears only after the controller has handled the failure: a checkpoint
        # registered after that is the restarted workers'.)
        log = tmp_path / "stage.log"
        wait_until(lambda: set(training_worker_pids(ray_head)) - set(workers), 300, "restarted workers", proc, log)
        before = max(registered_epochs(tmp_path))
        wait_until(lambda: max(registered_epochs(tmp_path) or [0]) > before, 300,
                   "a checkpoint of the restarted workers", proc, log)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        last = max(registered_epochs(tmp_path))
        done = run_stage("train", params, **ray_head.client_env(), MLFLOW_TRACKING_URI=server.uri)
        assert done.returncode == 0, done.stderr[-3000:]
        resumed_at = read_metrics(tmp_path)["resumed_at_epochs"]
        # resumed twice: after the worker (from epoch k >= 1), after the driver (from a later one)
        assert len(resumed_at) == 2 and 1 <= resumed_at[0] < resumed_at[1] and resumed_at[1] >= last, resumed_at
        # Each restart says so in one line of the project's (Ray Train's own decision block, a
        # traceback of 40 lines, is for --verbose).
        assert f"resumed from the checkpoint of epoch {resumed_at[0]} of 6" in log.read_text(), log.read_text()[-3000:]
        assert f"resumed from the checkpoint of epoch {resumed_at[1]} of 6" in done.stdout + done.stderr
        assert "[FailurePolicy]" not in log.read_text()
        assert curve_epochs(tmp_path) == [1, 2, 3, 4, 5, 6]

        client = mlflow.MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("hmsa")
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 1  # the resumed training continued the same run
        run = runs[0]
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "val_miou")
        assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]  # each epoch logged once
        assert run.data.tags["method"] == "hierarchical" and run.data.tags["dataset_manifest"]
        assert run.data.params["model.trunk"] == "resnet18"
        models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
        assert len(models) == 1 and models[0].source_run_id == run.info.run_id
    finally:
        server.stop()


@pytest.mark.parametrize(
    "sections, env, message",
    [
        ({"ray": {"num_workers": 8}}, {}, "ray.num_workers = 8"),
        ({"ray": {"use_gpu": True}}, {}, "ray.use_gpu = true, but the cluster has no GPU"),
        ({}, {"RAY_ADDRESS": "127.0.0.1:1"}, "RAY_ADDRESS = '127.0.0.1:1': no Ray cluster answers there"),
        ({}, {"HMSA_STORAGE": "/dev/null/checkpoints"}, "HMSA_STORAGE = /dev/null/checkpoints: cannot write there"),
        ({}, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, "MLFLOW_TRACKING_URI = http://127.0.0.1:9: no MLflow"),
        # an unknown scheme used to fail only once Ray had started, in a traceback
        ({}, {"MLFLOW_TRACKING_URI": "ftp://127.0.0.1/runs"}, "MLFLOW_TRACKING_URI = ftp://127.0.0.1/runs: unsupported "
                                                                "scheme 'ftp'"),
        # the tiny dataset has 19 classes; a mismatch used to fail in every worker, once per retry
        ({"model": {"num_classes": 7}}, {}, "model.num_classes = 7, but the dataset at"),
        # a batch above the split's size used to train nothing and record the untrained model as done
        ({"train": {"batch_size": 64}}, {}, "train.batch_size = 64, but each of 1 worker(s)"),
    ],
)
def test_bad_cluster_configuration_fails_fast(tmp_path, data, ray_head, sections, env, message):
    params = write_params(tmp_path, data, **sections)
    start = time.time()
    done = run_stage("train", params, timeout=120, **{**ray_head.client_env(), **env})
    assert done.returncode == 1 and message in done.stderr, done.stderr[-2000:]
    # One line of ours (Ray's own INFO lines aside) that names the setting, and no traceback.
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and not project_tracebacks(done.stderr)
    assert time.time() - start < 30
    assert not (tmp_path / "model").exists()


def test_ddp_code_change_trains_again_and_unchanged_rerun_reuses(tmp_path, data, ray_head):
    """Two DDP workers keep one model. Same code, config and data: the finished run is reused
    (nothing trained, and it says so). A code change: a new run that trains from scratch, never a
    'resume' into zero epochs."""
    params = write_params(tmp_path, data, train={"epochs": 1}, ray={"num_workers": 2})
    first = run_stage("train", params, **ray_head.client_env())
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = read_metrics(tmp_path)
    assert metrics["num_workers"] == 2 and metrics["epochs"] == 1
    # The SHA-256 of every parameter matched across both ranks after every epoch.
    assert metrics["replicas_in_sync"] is True
    _model, cfg = load_saved_model(tmp_path / "model")
    assert cfg.method == "hierarchical"
    # The first worker says once what precision auto chose (Ray Train echoes a worker's stdout twice).
    assert (first.stdout + first.stderr).count("precision auto on cpu: ") == 1, [
        line for line in (first.stdout + first.stderr).splitlines() if "precision" in line
    ]
    # One line per epoch from the project, none of Ray Train's per-report lines (700 characters each).
    assert (first.stdout + first.stderr).count("epoch 1/1: loss ") == 1
    assert "Reporting training result" not in first.stdout + first.stderr
    # Nor Ray's error-level line about its own preemption watcher (pipeline.runtime.ray_session.KNOWN_RAY_NOISE).
    assert "PreemptionWatcher" not in first.stdout + first.stderr
    # Nor Ray's, Ray Train's or MLflow's INFO lines (joining the cluster, starting the worker group,
    # the process group, the input example's validation, download bars): --verbose brings them back.
    for chatter in ("Connected to Ray cluster", "Requesting resources", "Attempting to start training worker group",
                    "Setting up process group", "INFO mlflow", "Downloading artifacts"):
        assert chatter not in first.stdout + first.stderr, chatter
    # The logged model carries an input example and typed input: none of MLflow's warnings on it.
    for warning in ("An input example was not provided", "Add type hints to the `predict` method"):
        assert warning not in first.stdout + first.stderr, warning
    (tmp_path / "model").rename(tmp_path / "model-first")

    again = run_stage("train", params, **ray_head.client_env())
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing the finished run" in again.stdout and "nothing to train" in again.stdout
    assert (tmp_path / "model" / "weights.safetensors").read_bytes() == (
        tmp_path / "model-first" / "weights.safetensors"
    ).read_bytes()

    from pipeline.runtime import ray_session

    # A real edit of the code the stage runs starts a new, complete run.
    code = tmp_path / "code"
    for item in ("components", "pipeline"):
        shutil.copytree(ray_session.REPO_ROOT / item, code / item)
    with open(code / "components" / "training.py", "a") as handle:
        handle.write("\n# an edit that changes the code fingerprint\n")
    edited = subprocess.run(
        stage_command("train", params),
        capture_output=True,
        text=True,
        cwd=code,
        env=stage_env(params, **ray_head.client_env(), PYTHONPATH=str(code)),
        timeout=600,
    )
    assert edited.returncode == 0, edited.stderr[-3000:]
    assert "reusing" not in edited.stdout and "training train-" in edited.stdout
    metrics = read_metrics(tmp_path)
    assert metrics["epochs"] == 1 and metrics["resumed_at_epochs"] == []
    # The edit changes no computation, and train.seed fixes every random draw (sample order, crops,
    # flips, colour jitter): the new run trains the same model, bit for bit.
    assert (tmp_path / "model" / "weights.safetensors").read_bytes() == (
        tmp_path / "model-first" / "weights.safetensors"
    ).read_bytes()
    runs = list((tmp_path / "store" / "ray").glob("train-*"))
    assert len({p.name for p in runs}) == 2  # two runs, one per code version

    # A finished run whose checkpoints are gone (storage cleaned, or HMSA_STORAGE moved): one line
    # that says where they were looked for and how to train again, and the outputs stay as they were.
    first_run = next(p for p in runs if p.name in again.stdout)
    shutil.rmtree(first_run)
    before = (tmp_path / "model" / "weights.safetensors").read_bytes()
    gone = run_stage("train", params, **ray_head.client_env())
    assert gone.returncode != 0 and not project_tracebacks(gone.stderr), gone.stderr[-3000:]
    assert str(first_run) in gone.stderr and "mlflow runs delete --run-id" in gone.stderr, gone.stderr[-3000:]
    assert (tmp_path / "model" / "weights.safetensors").read_bytes() == before


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_run_is_running_while_training_and_killed_on_sigterm_or_ctrl_c(tmp_path, data, ray_head, stop):
    """The MLflow run is RUNNING while training (not ended before it starts) and KILLED when the
    stage is stopped with SIGTERM, as a scheduler or `kill` would, or with Ctrl-C. Ray Train's own
    Ctrl-C handler, in place while a run fits, ended the stage with status 1 and not a word."""
    _params, proc = _start_training(tmp_path, data, ray_head, epochs=50)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hmsa")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "RUNNING"
    proc.send_signal(stop)
    proc.wait(timeout=120)
    log = (tmp_path / "stage.log").read_text()
    assert proc.returncode != 0, log[-2000:]
    if stop == signal.SIGINT:
        assert proc.returncode == 130, log[-2000:]
        assert log.strip().splitlines()[-1].startswith("interrupted: the stage stopped"), log[-2000:]
        assert not project_tracebacks(log)
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert not (tmp_path / "model").exists()


def test_a_diverging_training_ends_at_once_without_retries(tmp_path, data, ray_head):
    """A NaN loss is met again by every retry from the last checkpoint (same weights, data and
    settings): it used to be retried ray.max_failures times and end in a traceback minutes later."""
    params = write_params(tmp_path, data, train={"epochs": 3, "lr": 1e30}, ray={"max_failures": 3})
    # --verbose: Ray Train's own decision lines are what shows that it did not retry
    done = run_stage("train", params, timeout=300, **ray_head.client_env(), HMSA_VERBOSE="1")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(errors) == 1, done.stderr[-3000:]
    assert "training loss became" in errors[0] and "not retried" in errors[0], errors
    assert "[FailurePolicy] RAISE" in done.stderr and "[FailurePolicy] RETRY" not in done.stderr
    assert not (tmp_path / "model").exists()


def test_workers_that_cannot_start_fail_the_run_in_one_line_not_for_ever(tmp_path, data, ray_head):
    """Another job holds every CPU (a live job's placement group: nothing to free). Ray Train retried
    the worker group's start for ever (`max allowed: inf`), so a search never finished nor failed;
    now ray.max_start_failures bounds it and the stage says what holds the run."""
    with cpus_held_by_another_job(ray_head):
        params = write_params(tmp_path, data, ray={"max_start_failures": 1})
        done = run_stage("train", params, timeout=300, **ray_head.client_env(),
                         RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="3")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(errors) == 1, done.stderr[-3000:]
    assert "workers could not start 2 times" in errors[0] and "ray.max_start_failures" in errors[0], errors
    assert "Error count: 3" not in done.stdout + done.stderr  # Ray Train's decision lines: two starts only
