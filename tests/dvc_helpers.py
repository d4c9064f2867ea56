"""A copy of the project as its own git + DVC repository on a tiny configuration, and `dvc` in it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.services import python_env

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "prepare": {"synthetic": {"train_images": 8, "val_images": 4, "height": 64, "width": 96}},
    "model": {"trunk": "tiny", "decoder_channels": 16, "attention_channels": 16},
    "train": {"epochs": 2, "batch_size": 2, "crop_size": [64, 64]},
    "loader": {"workers": 0},
    "ray": {"cpus_per_worker": 1},
    "evaluate": {"scale_sets": [[1.0], [0.5, 1.0], [0.5, 1.0, 2.0]], "pictures": 1},
    # One trial: the stages after it need a search's outputs, not a search (tests/test_tune.py has one).
    "tune": {"num_samples": 1, "epochs": 1, "steps_per_epoch": 2},
    "eval_scales": {"scale_sets": {"s10": [1.0], "s05_10_20": [0.5, 1.0, 2.0]}},
    "ablation": {"epochs": 1, "crop_size": [64, 64], "seeds": [0, 1], "bootstrap_rounds": 200},
}


def dvc(workdir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run dvc in `workdir` (with this environment's tools on PATH); fails the test on an error."""
    base = env or python_env(RAY_ADDRESS="", HMSA_STORAGE="", MLFLOW_TRACKING_URI="")
    base = {**base, "PATH": f"{Path(sys.executable).parent}:{base['PATH']}"}
    done = subprocess.run(["dvc", *args], cwd=workdir, capture_output=True, text=True, env=base, timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def tiny_params(**sections) -> dict:
    """The repository's params.yaml with TINY and then `sections` merged in, key by key (a named set
    of scales or a search replaces the repository's whole, not entry by entry)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    replaced_whole = ("tune", "eval_scales")
    for overrides in (TINY, sections):
        for section, values in overrides.items():
            for key, value in values.items():
                if isinstance(value, dict) and isinstance(params[section].get(key), dict) \
                        and section not in replaced_whole:
                    params[section][key].update(value)
                else:
                    params[section][key] = value
    return params


def tiny_repo(path: Path, **sections) -> Path:
    """The project's stages and code with tiny params, as a fresh git + DVC repository at `path`."""
    path.mkdir(parents=True, exist_ok=True)
    for item in ("dvc.yaml", "pipeline", "components", ".gitignore", ".dvcignore"):
        source = ROOT / item
        (shutil.copytree if source.is_dir() else shutil.copy)(source, path / item,
                                                              **({"ignore": shutil.ignore_patterns("__pycache__")}
                                                                 if source.is_dir() else {}))
    (path / "params.yaml").write_text(yaml.safe_dump(tiny_params(**sections), sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    dvc(path, "init", "-q")
    return path
