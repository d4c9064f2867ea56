"""Faults with real processes: a full disk under the stage outputs. Each stage fails with one line
naming the problem, the previous outputs survive byte for byte, no temporary is left behind, and
once there is room a rerun finishes the work."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.output_checks import project_tracebacks
from tests.reliability.files import snapshot
from tests.services import python_env

pytestmark = pytest.mark.integration


@contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` at `path` (tests run as root, as CI does): a disk that fills up."""
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield lambda new_size: subprocess.run(["mount", "-o", f"remount,size={new_size}", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def run(stage: str, params: Path, systmp: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"pipeline.{stage}", "--params", str(params)],
                          capture_output=True, text=True, timeout=600, env=python_env(TMPDIR=str(systmp), **env))


def write(params: Path, disk: Path, train_images: int) -> None:
    params.write_text(yaml.safe_dump({
        "prepare": {"output": str(disk / "raw"),
                    "synthetic": {"train_images": train_images, "val_images": 2, "height": 64, "width": 96}},
        "pyramid": {"output": str(disk / "pyramid"), "scales": [0.5, 1.0, 2.0], "shard_size": 4},
        "loader": {"random_scales": [1.0, 2.0]},
    }))


def assert_failed_for_space(done: subprocess.CompletedProcess, key: str) -> None:
    assert done.returncode == 1, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert not project_tracebacks(done.stderr) and "No space left on device" in lines[-1], done.stderr[-2000:]
    assert f"while writing {key} = " in lines[-1], lines[-1]  # names the output it could not write


def test_a_full_disk_during_prepare_and_pyramid_loses_nothing(tmp_path):
    params, systmp = tmp_path / "params.yaml", tmp_path / "systmp"
    systmp.mkdir()
    disk = tmp_path / "disk"
    with small_disk(disk, "2m") as resize:
        write(params, disk, train_images=4)  # about 0.9 MB of outputs: fits
        for stage in ("prepare", "pyramid"):
            assert run(stage, params, systmp).returncode == 0
        before = snapshot(disk)

        write(params, disk, train_images=100)  # a new dataset of 1.7 MB: prepare runs out of room
        assert_failed_for_space(run("prepare", params, systmp), "prepare.output")
        assert snapshot(disk) == before  # the earlier dataset and pyramid, byte for byte; no temporary

        resize("6m")  # room for the dataset
        assert run("prepare", params, systmp).returncode == 0
        stats = os.statvfs(disk)
        used_kb = (stats.f_blocks - stats.f_bfree) * stats.f_frsize // 1024
        resize(f"{used_kb + 1024}k")  # 1 MB left: less than the new pyramid's 1.8 MB
        raw_now = snapshot(disk / "raw")
        assert_failed_for_space(run("pyramid", params, systmp), "pyramid.output")
        assert {k: v for k, v in snapshot(disk).items() if k.startswith("pyramid")} == \
            {k: v for k, v in before.items() if k.startswith("pyramid")}  # the earlier pyramid, whole
        # what is left beside them: the finished shards of the failed build, for its rerun, and no partial one
        build = [p for p in disk.iterdir() if p.name.startswith(".pyramid.build-")]
        assert sorted(p.name for p in disk.iterdir() if p not in build) == ["pyramid", "raw"]
        assert len(build) == 1 and not list(build[0].glob("*.part")) and snapshot(disk / "raw") == raw_now

        resize("32m")  # room again: the rerun finishes
        assert run("pyramid", params, systmp).returncode == 0
        assert (disk / "pyramid" / "manifest.json").is_file() and sorted(p.name for p in disk.iterdir()) == \
            ["pyramid", "raw"]
    assert not any(systmp.iterdir())  # nor in the system's temporary folder


def test_sigkill_of_the_pyramid_stage_keeps_the_earlier_pyramid(tmp_path):
    """SIGKILL while the pyramid stage writes (with two shard processes): the earlier pyramid stays
    byte for byte, its processes end with it (none holds the output), and the rerun completes and
    removes what the killed run left."""
    import os
    import signal
    import time

    params, systmp = tmp_path / "params.yaml", tmp_path / "systmp"
    systmp.mkdir()
    out = tmp_path / "out"
    write(params, out, train_images=4)
    for stage in ("prepare", "pyramid"):
        assert run(stage, params, systmp).returncode == 0
    before = snapshot(out / "pyramid")
    write(params, out, train_images=600)  # seconds of writing, so the signal lands mid-write
    params.write_text(params.read_text().replace("shard_size: 4", "shard_size: 4\n  workers: 2"))
    assert run("prepare", params, systmp).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.pyramid", "--params", str(params)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=python_env(TMPDIR=str(systmp)))
    deadline = time.time() + 120
    while time.time() < deadline and not any(len(list(p.glob("*.json"))) >= 2 for p in out.glob(".pyramid.build-*")):
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert snapshot(out / "pyramid") == before  # never a mix, never empty
    assert run("pyramid", params, systmp).returncode == 0
    assert (out / "pyramid" / "manifest.json").is_file() and not list(out.glob(".pyramid.*"))


def test_prepare_and_pyramid_on_ray_tasks_write_the_local_bytes_and_a_damaged_file_is_one_line(tmp_path, ray_head):
    """With RAY_ADDRESS, samples are converted and tiles cut by Ray tasks (sent the files' bytes, as a
    node without the driver's disk needs), and each stage writes the same bytes as this machine's
    processes do. A raw or prepared file that cannot be read stops the stage with one line naming it
    (or, with on_bad_sample: skip, drops the sample with the same reason); the outputs stay."""
    from components.data.synthetic import write_cityscapes_layout

    params, systmp = tmp_path / "params.yaml", tmp_path / "systmp"
    systmp.mkdir()
    out = tmp_path / "out"
    source = write_cityscapes_layout(tmp_path / "cityscapes", {"train": 6, "val": 2}, 64, 96, seed=2)

    def write_params(**prepare) -> None:
        params.write_text(yaml.safe_dump({
            "prepare": {"dataset": "cityscapes", "source": str(source), "output": str(out / "raw"), **prepare},
            "pyramid": {"output": str(out / "pyramid"), "scales": [0.5, 1.0, 2.0], "shard_size": 4},
            "loader": {"random_scales": [1.0, 2.0]},
        }))

    write_params()
    for stage in ("prepare", "pyramid"):
        assert run(stage, params, systmp).returncode == 0
    local = {stage: snapshot(out / stage) for stage in ("raw", "pyramid")}
    (out / "pyramid").rename(out / "local")  # the same output paths again, so the manifests agree too

    converted = run("prepare", params, systmp, **ray_head.client_env())
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert "prepare: converting samples as Ray tasks on the Ray cluster at" in converted.stdout
    assert "(converted on 1 Ray node(s))" in converted.stdout, converted.stdout[-2000:]
    assert snapshot(out / "raw") == local["raw"]
    done = run("pyramid", params, systmp, **ray_head.client_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pyramid: cutting tiles as Ray tasks on the Ray cluster at" in done.stdout
    assert "(tiles cut on 1 Ray node(s))" in done.stdout, done.stdout[-2000:]
    assert snapshot(out / "pyramid") == local["pyramid"]

    raw_image = sorted((source / "leftImg8bit" / "train").rglob("*.png"))[2]
    raw_image.write_bytes(raw_image.read_bytes()[:100])  # a truncated PNG in the user's dataset
    failed = run("prepare", params, systmp, **ray_head.client_env())
    assert failed.returncode == 1 and not project_tracebacks(failed.stderr), failed.stderr[-3000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert str(raw_image) in last and "unreadable image" in last, last
    assert snapshot(out / "raw") == local["raw"]
    write_params(on_bad_sample="skip")
    skipping = run("prepare", params, systmp, **ray_head.client_env())
    assert skipping.returncode == 0, skipping.stderr[-3000:]
    assert f": {raw_image}: unreadable image" in skipping.stdout and ", 1 skipped" in skipping.stdout

    damaged = sorted((out / "raw" / "images" / "train").glob("*.png"))[3]
    damaged.write_bytes(damaged.read_bytes()[:100])  # a prepared file truncated after prepare
    params.write_text(params.read_text().replace("shard_size: 4", "shard_size: 2"))  # another build
    failed = run("pyramid", params, systmp, **ray_head.client_env())
    assert failed.returncode == 1 and not project_tracebacks(failed.stderr), failed.stderr[-3000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert str(damaged) in last and "rerun the prepare stage" in last, last
    assert snapshot(out / "pyramid") == local["pyramid"] and not list(out.glob(".pyramid.build-*/*.part"))


@pytest.mark.timeout(900)
def test_a_full_disk_under_the_training_outputs_is_one_line_and_the_rerun_finishes(tmp_path, ray_head):
    """train.output, metrics and curves on a 64 KB tmpfs: the training runs, writing its outputs
    fails with one line naming train.output; with room, the rerun writes them from the finished
    training (no second training, one MLflow run)."""
    import mlflow

    from tests.train_helpers import run_stage, tiny_pyramid, write_params

    data = tiny_pyramid(tmp_path / "data")
    disk = tmp_path / "disk"
    with small_disk(disk, "64k") as resize:
        params = write_params(tmp_path, data, train={"epochs": 2, "output": str(disk / "model"),
                                                     "metrics": str(disk / "metrics.json"),
                                                     "curves": str(disk / "curves.csv")})
        done = run_stage("train", params, **ray_head.client_env())
        assert_failed_for_space(done, "train.output")
        assert not (disk / "model").exists() and not list(disk.glob(".model.tmp-*"))
        resize("16m")
        again = run_stage("train", params, **ray_head.client_env())
        assert again.returncode == 0, again.stderr[-3000:]
        assert (disk / "model").is_dir() and (disk / "metrics.json").is_file()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("hmsa").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
