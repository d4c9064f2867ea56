"""Outputs are owned. One run at a time on an output: a second run is refused at once naming the
holder, a temporary is removed as stale only when no live run holds its output, and a killed holder
leaves no stale lock. A file output replaces only a file the pipeline wrote there, and a stage says
so before any work."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.atomic import OutputBusyError, atomic_dir, atomic_file, output_lock
from components.owned_files import json_with
from tests.output_checks import project_tracebacks
from tests.services import python_env

HOLDER = """
import sys, time
from pathlib import Path
from components.atomic import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "half.txt").write_text("being written")
    print("holding", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """A live process in the middle of writing tmp_path/out (its temporary exists), killed at the end."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "out")], stdout=subprocess.PIPE,
                            text=True, env=python_env())
    assert proc.stdout.readline().strip() == "holding"
    yield proc
    proc.kill()
    proc.wait()


def temporaries(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_a_second_writer_is_refused_naming_the_holder_and_its_temporary_survives(tmp_path, holder):
    (written,) = temporaries(tmp_path)
    busy = rf"prepare.output = {tmp_path / 'out'}: another run is writing it \(pid {holder.pid} on .*-c"
    with pytest.raises(OutputBusyError, match=busy), atomic_dir(tmp_path / "out", key="prepare.output"):
        pass
    assert temporaries(tmp_path) == [written]  # not removed as stale: its writer lives
    assert (tmp_path / written / "half.txt").read_text() == "being written"


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "whole.txt").write_text("done")
    assert temporaries(tmp_path) == []  # the killed writer's temporary was stale, and removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the lock file goes with its run
    assert (tmp_path / "out" / "whole.txt").read_text() == "done"


def test_one_process_may_take_its_own_lock_again(tmp_path):
    """A stage locks its output for the whole run and then writes it through atomic_dir/atomic_file."""
    with output_lock(tmp_path / "metrics.json"), atomic_file(tmp_path / "metrics.json", json_with()) as handle:
        handle.write("{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def stopped_while_holding(command: list[str], lock: Path, attempts: int = 5) -> subprocess.Popen:
    """Start `command` and stop it (SIGSTOP) while it holds `lock`. The lock is held once its file
    names the run (written after the flock is taken); a run that let go of it between that check and
    the stop (a busy machine can take longer than the whole run) is let finish, and another started."""
    for _ in range(attempts):
        run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=python_env())
        deadline = time.time() + 120
        while time.time() < deadline and run.poll() is None and f"pid {run.pid} on" not in read_or_empty(lock):
            time.sleep(0.01)
        os.kill(run.pid, signal.SIGSTOP)
        if run.poll() is None and f"pid {run.pid} on" in read_or_empty(lock):
            return run
        os.kill(run.pid, signal.SIGCONT)
        assert run.wait(timeout=120) == 0, run.stderr.read()
    raise AssertionError(f"no run of {command} could be stopped while it held {lock} in {attempts} tries")


def read_or_empty(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_two_prepare_runs_on_one_output_do_not_mix(tmp_path):
    """The measured case: each run deleted the other's temporaries as stale and one reported success
    with files missing. The first run is stopped (SIGSTOP) while it holds the output, so the second
    meets it there whatever the machine's load; resumed, the first finishes whole."""
    params = tmp_path / "params.yaml"
    out = tmp_path / "raw"
    params.write_text(f"prepare:\n  output: {out}\n  synthetic: {{train_images: 40, val_images: 4, height: 32, "
                      "width: 64}\n")
    command = [sys.executable, "-m", "pipeline.prepare", "--params", str(params)]
    first = stopped_while_holding(command, tmp_path / ".raw.lock")
    try:
        second = subprocess.run(command, capture_output=True, text=True, env=python_env(), timeout=120)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 1 and f"prepare.output = {out}: another run is writing it (pid {first.pid}" \
        in second.stderr, second.stderr
    assert not project_tracebacks(second.stderr)
    assert first.wait(timeout=120) == 0, first.stderr.read()
    images = list((out / "images" / "train").iterdir())
    assert len(images) == 40 and all(p.stat().st_size > 0 for p in images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "raw"]


def test_two_predict_runs_into_one_folder_are_refused(tmp_path, holder):
    """`predict --output` locks its folder for the whole run (its files are written one by one)."""
    from pipeline.predict import predict

    class AnyModel:
        def check_scales(self, scales):
            return scales

    with pytest.raises(OutputBusyError, match=f"--output = {tmp_path / 'out'}: another run"):
        predict(AnyModel(), [tmp_path / "x.png"], [1.0], tmp_path / "out", colors=[])


@pytest.mark.parametrize("existing", ["notes", "other_json", "fifo", "folder", "huge"])
def test_a_file_output_replaces_only_what_the_stage_wrote_there(tmp_path, existing):
    from pipeline.runtime.output_files import TRAINING_METRICS

    target = tmp_path / "metrics.json"
    if existing == "notes":
        target.write_text("# my notes\nthe only copy\n")
    elif existing == "other_json":
        target.write_text('{"name": "my-package", "version": "1.0"}\n')
    elif existing == "fifo":
        os.mkfifo(target)  # must be refused without being opened (opening would hang)
    elif existing == "folder":
        target.mkdir()
    else:
        with open(target, "wb") as handle:  # sparse: refused from its size, never read whole
            handle.truncate(6 << 30)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(FileExistsError, match=f"train.metrics = {target}: "), \
            atomic_file(target, TRAINING_METRICS, key="train.metrics") as handle:
        handle.write("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if existing == "notes":
        assert target.read_text() == "# my notes\nthe only copy\n"


def test_a_file_output_the_stage_wrote_is_replaced_through_a_dvc_link(tmp_path):
    """DVC may check an output out as a link into its cache: the link is replaced, the cache kept."""
    from pipeline.runtime.output_files import TRAINING_METRICS

    cached = tmp_path / "cache-entry"
    cached.write_text('{"best_val_miou": 0.5, "epochs": 3}\n')
    (tmp_path / "metrics.json").symlink_to(cached)
    with atomic_file(tmp_path / "metrics.json", TRAINING_METRICS) as handle:
        handle.write('{"best_val_miou": 0.6, "epochs": 3}\n')
    assert not (tmp_path / "metrics.json").is_symlink() and "0.6" in (tmp_path / "metrics.json").read_text()
    assert "0.5" in cached.read_text()


@pytest.mark.parametrize("stage, section", [("train", {"train": {"metrics": "NOTES.md"}}),
                                            ("register", {"register": {"output": "NOTES.md"}})])
def test_stages_refuse_a_users_file_before_any_work(tmp_path, stage, section):
    """Before Ray, MLflow or the pyramid: a refusal after hours of training (or after the registry
    moved an alias) would lose the work."""
    import yaml

    (tmp_path / "NOTES.md").write_text("mine\n")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**section, "tune": {"apply_to_train": False}}))
    done = subprocess.run([sys.executable, "-m", f"pipeline.{stage}", "--params", "params.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, env=python_env(), timeout=120)
    key = next(f"{s}.{k}" for s, v in section.items() for k in v)
    assert done.returncode == 1 and f"{key} = NOTES.md: holds a file this pipeline did not write" in done.stderr, \
        done.stderr[-2000:]
    assert not project_tracebacks(done.stderr) and "Ray" not in done.stderr
    assert (tmp_path / "NOTES.md").read_text() == "mine\n"
