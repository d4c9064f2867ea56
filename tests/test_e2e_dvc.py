"""End to end: `dvc repro` of the whole pipeline on a tiny configuration, in a copy of the repo."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.services import python_env

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "prepare": {"synthetic": {"train_images": 8, "val_images": 4, "height": 64, "width": 96}},
    "model": {"trunk": "tiny", "decoder_channels": 16, "attention_channels": 16},
    "train": {"epochs": 2, "batch_size": 2, "crop_size": [64, 64]},
    "loader": {"workers": 0},
    "ray": {"cpus_per_worker": 1},
    "evaluate": {"scale_sets": [[1.0], [0.5, 1.0], [0.5, 1.0, 2.0]], "pictures": 1},
    "tune": {"num_samples": 2, "epochs": 1, "steps_per_epoch": 2,
             "eval_scale_sets": {"s10": [1.0], "s05_10_20": [0.5, 1.0, 2.0]}},
    "ablation": {"epochs": 1, "crop_size": [64, 64]},
}


def dvc(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = python_env(PATH=f"{Path(sys.executable).parent}:{python_env()['PATH']}", RAY_ADDRESS="")
    done = subprocess.run(["dvc", *args], cwd=workdir, capture_output=True, text=True, env=env, timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def test_dvc_repro_whole_pipeline(tmp_path):
    for item in ("dvc.yaml", "pipeline", "components"):
        source = ROOT / item
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / item)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(params[section].get(key), dict) and section != "tune":
                params[section][key].update(value)
            else:
                params[section][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc(tmp_path, "init", "-q")

    dvc(tmp_path, "repro")
    table = json.loads((tmp_path / "results/ablation/table.json").read_text())
    assert [row["method"] for row in table] == ["single", "avgpool", "maxpool", "explicit", "hierarchical"]
    registration = json.loads((tmp_path / "results/register/registration.json").read_text())
    assert registration["promoted"] and registration["aliases"]["champion"] == registration["version"]
    assert yaml.safe_load((tmp_path / "results/tune/best.yaml").read_text())["settings"]
    assert yaml.safe_load((tmp_path / "results/tune/eval_scales.yaml").read_text())["recommended"]
    assert json.loads((tmp_path / "results/eval/metrics.json").read_text())["0.5,1,2"]["miou"] >= 0

    again = dvc(tmp_path, "repro")  # nothing changed: nothing runs
    assert "Running stage" not in again.stdout

    params["pyramid"]["scales"] = params["pyramid"]["scales"] + [2.5]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = dvc(tmp_path, "repro", "pyramid")  # only the pyramid stage reruns
    assert "Running stage 'pyramid'" in rerun.stdout and "Running stage 'prepare'" not in rerun.stdout
