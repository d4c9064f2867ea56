"""A tiny dataset and params for training tests, and a way to run stages as subprocesses."""

from __future__ import annotations

import contextlib
import csv
import json
import subprocess
import sys
from pathlib import Path

import yaml

from components.data.prepare import prepare_dataset
from components.data.pyramid import build_pyramid
from components.data.readers import read_cityscapes
from components.data.synthetic import write_cityscapes_layout
from components.storage import Storage
from tests.services import python_env


def tiny_pyramid(root: Path, train_images: int = 8, val_images: int = 4, size=(64, 96)) -> Path:
    write_cityscapes_layout(root / "cs", {"train": train_images, "val": val_images}, *size, seed=5)
    prepare_dataset(read_cityscapes(root / "cs"), root / "raw")
    build_pyramid(root / "raw", [0.25, 0.5, 1.0, 2.0], 16, Storage(), str(root / "pyramid"))
    return root


def write_params(workdir: Path, data: Path, **sections) -> Path:
    """params.yaml for a quick training on the tiny pyramid; `sections` override per section."""
    params = {
        "prepare": {"output": str(data / "raw")},
        "pyramid": {"output": str(data / "pyramid")},
        "model": {"trunk": "tiny", "decoder_channels": 16, "attention_channels": 16},
        "train": {"epochs": 3, "batch_size": 2, "crop_size": [64, 64], "output": str(workdir / "model"),
                  "metrics": str(workdir / "metrics.json"), "curves": str(workdir / "curves.csv"),
                  "run_record": str(workdir / "run.json")},
        "loader": {"workers": 0},
        "ray": {"num_workers": 1, "cpus_per_worker": 1},
        "tune": {"apply_to_train": False, "trials": str(workdir / "tune" / "trials.csv"),
                 "best": str(workdir / "tune" / "best.yaml")},
        "eval_scales": {"table": str(workdir / "eval_scales" / "table.csv"),
                        "image_matrices": str(workdir / "eval_scales" / "image_matrices.npz"),
                        "recommendation": str(workdir / "eval_scales" / "recommended.yaml")},
    }
    for section, values in sections.items():
        params.setdefault(section, {}).update(values)
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def stage_command(stage: str, params: Path) -> list[str]:
    return [sys.executable, "-m", f"pipeline.{stage}", "--params", str(params)]


def stage_env(params: Path, **extra) -> dict:
    """The environment of a stage run for the params file's folder: checkpoints in `store/`, a
    SQLite tracking store beside it (both overridable, e.g. with a real server or S3)."""
    workdir = Path(params).parent
    values = {"HMSA_STORAGE": str(workdir / "store"), "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    values.update(extra)
    return python_env(**values)


def run_stage(stage: str, params: Path, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(stage_command(stage, params), capture_output=True, text=True, timeout=timeout,
                          env=stage_env(params, **env))


def run_on_cluster(command: list[str], env: dict, timeout: float, cluster) -> subprocess.CompletedProcess:
    """Run a stage joined to `cluster` (a RayHead); past `timeout`, fail with the stage's last
    output and the cluster's state (waiting placement groups, live actors) instead of a bare timeout."""
    try:
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        def text(value):
            return (value.decode(errors="replace") if isinstance(value, bytes) else value or "")[-6000:]
        raise AssertionError(f"{command[2]} still running after {timeout}s\n--- stdout\n{text(expired.stdout)}\n"
                             f"--- stderr\n{text(expired.stderr)}\n--- cluster\n{cluster.describe()}") from None


def checkpoint_dirs(workdir: Path) -> list[Path]:
    """Ray Train checkpoint directories of the runs under `workdir/store`."""
    return sorted(p for p in (workdir / "store" / "ray").glob("*/checkpoint_*") if p.is_dir())


def read_metrics(workdir: Path) -> dict:
    return json.loads((workdir / "metrics.json").read_text())


def tiny_search(**settings) -> dict:
    """A `tune` section for a search of one-epoch trials on the tiny pyramid, one training set."""
    return {"num_samples": 1, "epochs": 1, "steps_per_epoch": None, "grace_period": 1,
            "train_scale_sets": {"s05_10": [0.5, 1.0]}, **settings}


def trial_rows(workdir: Path) -> list[dict]:
    """The rows of a search's trials.csv (tune.trials as write_params sets it)."""
    with open(workdir / "tune" / "trials.csv") as handle:
        return list(csv.DictReader(handle))


def curve_epochs(workdir: Path) -> list[int]:
    lines = (workdir / "curves.csv").read_text().splitlines()[1:]
    return [int(line.split(",")[0]) for line in lines]


HOLD_THE_CPUS = """
import time, ray
ray.init()
group = ray.util.placement_group([{"CPU": ray.cluster_resources()["CPU"]}])
ray.get(group.ready())
print("held", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def cpus_held_by_another_job(cluster):
    """Every CPU of `cluster` (a RayHead) held by a live job's placement group: nothing to free."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_CPUS], stdout=subprocess.PIPE, text=True,
                              env=python_env(**cluster.client_env()))
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()
