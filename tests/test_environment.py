"""Where a run happens comes from the environment; the schedule counts samples, not worker steps."""

from pathlib import Path

import pytest

from components.config import TrainConfig
from components.training import epoch_plan, poly_lr
from pipeline.runtime.environment import Environment


def test_defaults_are_this_machine_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = Environment.from_environ({})
    assert env.ray_address is None and env.storage_root is None
    assert env.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}" and env.tracking_is_local
    assert env.checkpoint_root() == str(tmp_path / "ray_results") and env.pyramid_root() is None
    assert env.local_artifact_location() == (tmp_path / "mlartifacts").as_uri()
    assert env.ray_storage() == (str(tmp_path / "ray_results"), None)


def test_a_dvc_temporary_experiment_tracks_into_its_checkouts_store(tmp_path, monkeypatch):
    """`dvc exp run --temp` and queued experiments run in <checkout>/.dvc/tmp/exps/<tmp>/, which DVC
    deletes afterwards: the default SQLite store (and its artifacts) must be the checkout's."""
    workspace = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpk2x9" / "sub"
    workspace.mkdir(parents=True)
    monkeypatch.chdir(workspace)
    env = Environment.from_environ({})
    assert env.tracking_uri == f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"
    assert env.local_artifact_location() == (tmp_path / "repo" / "mlartifacts").as_uri()
    other = Environment.from_environ({"MLFLOW_TRACKING_URI": "sqlite:///runs/mlflow.db"})
    assert other.tracking_uri == f"sqlite:///{tmp_path / 'repo' / 'runs' / 'mlflow.db'}"


def test_s3_storage_builds_one_filesystem_with_endpoint_and_region():
    env = Environment.from_environ({"HMSA_STORAGE": "s3://bucket/team/hmsa", "AWS_DEFAULT_REGION": "eu-west-1",
                                    "AWS_ENDPOINT_URL": "http://127.0.0.1:8333",
                                    "MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert env.checkpoint_root() == "s3://bucket/team/hmsa/ray"
    assert env.pyramid_root() == "s3://bucket/team/hmsa/pyramids"
    path, filesystem = env.ray_storage()
    assert path == "bucket/team/hmsa/ray"  # pyarrow wants no scheme; the filesystem carries it
    state = filesystem.__reduce__()[1][0]
    assert state["endpoint_override"] == "http://127.0.0.1:8333" and state["region"] == "eu-west-1"
    assert state["scheme"] == "http" and state["access_key"] is None  # credentials never pickled
    assert not env.tracking_is_local and env.local_artifact_location() is None


def test_the_service_endpoint_specific_variable_wins():
    env = Environment.from_environ({"AWS_ENDPOINT_URL": "http://general", "AWS_ENDPOINT_URL_S3": "http://s3"})
    assert env.s3_endpoint == "http://s3"


def test_worker_variables_carry_resolved_locations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HMSA_STORAGE", "shared")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env = Environment.from_environ()
    variables = env.worker_variables()
    assert variables["HMSA_STORAGE"] == str(tmp_path / "shared")  # not relative to the worker's folder
    assert variables["MLFLOW_TRACKING_URI"].startswith("sqlite:////")
    # Credentials never travel with the job (Ray logs a job's runtime_env); nodes hold their own.
    assert "AWS_SECRET_ACCESS_KEY" not in variables and "s3cr3t" not in repr(variables)


def test_credentials_in_the_tracking_uri_become_mlflow_variables():
    from pipeline.runtime.common import move_uri_credentials

    env = {"MLFLOW_TRACKING_URI": "https://ada:p%40ss:word@mlflow.example:5000/base"}
    move_uri_credentials(env)
    assert env == {"MLFLOW_TRACKING_URI": "https://mlflow.example:5000/base", "MLFLOW_TRACKING_USERNAME": "ada",
                   "MLFLOW_TRACKING_PASSWORD": "p@ss:word"}
    plain = {"MLFLOW_TRACKING_URI": "sqlite:////tmp/x@y/mlflow.db"}
    move_uri_credentials(plain)
    assert plain == {"MLFLOW_TRACKING_URI": "sqlite:////tmp/x@y/mlflow.db"}


def test_storage_root_without_bucket_is_refused():
    with pytest.raises(ValueError, match="s3://"):
        Environment.from_environ({"HMSA_STORAGE": "s3://"})


@pytest.mark.parametrize("world", [1, 2, 4])
def test_epoch_is_counted_in_samples_whatever_the_worker_count(world):
    cfg = TrainConfig(batch_size=2, epochs=3)
    samples, steps = epoch_plan(16, cfg, max_workers=4, world=world)
    assert samples == 16 and steps * cfg.batch_size * world == 16


def test_step_cap_is_at_the_full_worker_count():
    cfg = TrainConfig(batch_size=2, steps_per_epoch=2)
    assert epoch_plan(100, cfg, max_workers=2, world=2) == (8, 2)
    assert epoch_plan(100, cfg, max_workers=2, world=1) == (8, 4)  # one worker left: twice the steps


def test_learning_rate_is_a_function_of_samples_seen():
    # Two workers for 8 steps, or one worker for 16 steps, pass the same sample counts at the same lr.
    two = [poly_lr(0.1, step * 4, 64, 0.9) for step in range(0, 16, 1)][::1]
    one = [poly_lr(0.1, step * 2, 64, 0.9) for step in range(32)]
    assert two[:16] == one[::2][:16]
    assert poly_lr(0.1, 64, 64, 0.9) == 0.0 and poly_lr(0.1, 0, 64, 0.9) == 0.1


def test_pyramid_content_hash_names_the_content(tmp_path):
    from components.data.pyramid import content_hash

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
        (tmp_path / name / "train-00000.bin").write_bytes(b"x" * 10)
    assert content_hash(tmp_path / "a") == content_hash(tmp_path / "b")
    (tmp_path / "b" / "train-00000.bin").write_bytes(b"y" * 10)
    assert content_hash(tmp_path / "a") != content_hash(tmp_path / "b")


def test_publish_once_never_overwrites(tmp_path):
    from components.storage import Storage

    source = tmp_path / "src"
    source.mkdir()
    (source / "manifest.json").write_text("first")
    target = str(tmp_path / "published" / "abc")
    assert Storage().publish_once(source, target) is True
    (source / "manifest.json").write_text("second")
    assert Storage().publish_once(source, target) is False
    assert Path(target, "manifest.json").read_text() == "first"


def test_redaction_masks_uri_credentials_and_secret_variables():
    from components.redact import redact

    env = {"AWS_SECRET_ACCESS_KEY": "fake-secret-KEY-123", "MLFLOW_TRACKING_PASSWORD": "hunter22"}
    text = ("MLFLOW_TRACKING_URI = http://alice:hunter22@mlflow:5000: no server; "
            "s3://bucket/prefix with fake-secret-KEY-123 and postgresql://u:p%40ss@db/x")
    masked = redact(text, env)
    for secret in ("hunter22", "alice", "fake-secret-KEY-123", "p%40ss"):
        assert secret not in masked
    assert "http://***@mlflow:5000" in masked and "s3://bucket/prefix" in masked
    assert redact("http://mlflow:5000/path?x=1", {}) == "http://mlflow:5000/path?x=1"  # nothing to hide


def test_a_bad_tracking_uri_with_credentials_is_reported_without_them(tmp_path):
    import subprocess
    import sys

    from tests.services import python_env
    from tests.train_helpers import tiny_pyramid, write_params

    params = write_params(tmp_path, tiny_pyramid(tmp_path / "data", train_images=2, val_images=1))
    done = subprocess.run([sys.executable, "-m", "pipeline.train", "--params", str(params)], capture_output=True,
                          text=True, env=python_env(MLFLOW_TRACKING_URI="http://alice:hunter22@127.0.0.1:9"),
                          cwd=tmp_path)
    assert done.returncode == 1 and "127.0.0.1:9" in done.stderr, done.stderr[-2000:]
    assert "hunter22" not in done.stderr + done.stdout and "alice" not in done.stderr + done.stdout


def test_a_training_stopped_by_storage_is_one_line_naming_it():
    from pipeline.runtime.cluster import storage_failure

    class ControllerError(RuntimeError):  # what Ray raises, with pyarrow's error as its cause
        pass

    cause = OSError("When initiating multiple part upload for key 'x/checkpoint_manager_snapshot.json' in bucket "
                    "'runs': AWS Error NETWORK_CONNECTION during CreateMultipartUpload operation: curlCode: 7")
    try:
        try:
            raise cause
        except OSError as inner:
            raise ControllerError("Training failed due to controller error:") from inner
    except ControllerError as err:
        found = storage_failure(err, "s3://runs/hmsa/ray")
    assert found is not None and str(found).startswith("HMSA_STORAGE = s3://runs/hmsa/ray: training stopped because")
    assert "NETWORK_CONNECTION" in str(found) and "run the stage again" in str(found)
    assert storage_failure(ValueError("a bug of ours"), "s3://runs/hmsa/ray") is None


# A stage that fails while a Ray process is still writing: the line arrives at the driver after the
# error unless the stage stops Ray's forwarding first. The exit handler stands for the work a real stage
# does on its way out (MLflow ends its run, temporaries are removed) while Ray keeps forwarding.
FAILS_WHILE_RAY_WRITES = """
import atexit, sys, time
import ray
from pipeline.runtime.common import run_stage

@ray.remote(num_cpus=0)
class Chatty:
    def start(self):
        import threading
        def chatter():
            while True:
                print("a Ray process still writing", file=sys.stderr, flush=True)
                time.sleep(0.05)
        threading.Thread(target=chatter, daemon=True).start()
        return True

def main(cfg):
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=True)
    chatty = Chatty.remote()
    ray.get(chatty.start.remote())
    time.sleep(2)  # the chatter is on its way to the driver
    atexit.register(time.sleep, 2)
    raise ValueError("train.output = /nowhere: the named problem")

run_stage(main, "fails while a Ray process writes")
"""


@pytest.mark.integration
def test_the_error_line_is_the_last_line_whatever_ray_still_forwards(tmp_path):
    import subprocess
    import sys

    from tests.services import python_env

    (tmp_path / "params.yaml").write_text("{}\n")
    done = subprocess.run([sys.executable, "-c", FAILS_WHILE_RAY_WRITES], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=python_env())
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr[-2000:]
    assert "a Ray process still writing" in done.stderr  # the forwarding was on
    assert lines[-1] == "error: train.output = /nowhere: the named problem", lines[-5:]


@pytest.mark.parametrize("failure", [None, ValueError("train.lr = -1: the named problem"), KeyboardInterrupt()])
def test_a_stage_leaves_what_it_loaded_out_of_the_collection_at_exit(tmp_path, monkeypatch, failure):
    """Python's exit collects every object still alive; with torch, Ray and MLflow loaded that pass
    cost a stage process about 1.1 CPU-s after its last line. Whichever way a stage ends, what is
    left is moved out of it (gc.freeze), and exit handlers still run."""
    import gc
    import logging
    import signal

    from pipeline.runtime.common import run_stage

    def main(cfg):
        if failure is not None:
            raise failure

    (tmp_path / "params.yaml").write_text("{}\n")
    monkeypatch.setattr("sys.argv", ["stage", "--params", str(tmp_path / "params.yaml")])
    # what a stage sets for its own process, undone for this one
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "WARNING")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.setattr(logging.getLogger("mlflow"), "level", logging.getLogger("mlflow").level)
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    gc.unfreeze()
    try:
        if failure is None:
            run_stage(main, "ends")
        else:
            with pytest.raises(SystemExit):
                run_stage(main, "fails")
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # this test process goes on collecting as before
        for number, handler in handlers.items():
            signal.signal(number, handler)
