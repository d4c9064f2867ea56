"""DVC as its users drive it: `dvc exp run -S`, `dvc exp show`, `dvc plots show`, and the `-S`
examples of the README."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from components.config import load_config
from tests.dvc_helpers import ROOT, dvc, tiny_repo

pytestmark = pytest.mark.e2e


def experiments(show: list[dict]) -> dict[str, dict]:
    """Experiment name -> its data (params, metrics) from `dvc exp show --json`."""
    found = {}
    for commit in show:
        for experiment in commit.get("experiments") or []:
            for rev in experiment["revs"]:
                found[rev["name"]] = rev["data"]
    return found


def metric(data: dict, file: str, *keys: str):
    value = data["metrics"][file]["data"]
    for key in keys:
        value = value[key]
    return value


@pytest.mark.timeout(1500)
def test_exp_run_twice_then_exp_show_and_plots(tmp_path):
    repo = tiny_repo(tmp_path / "repo")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"], cwd=repo, check=True)

    # train.seed, not train.lr: with tune.apply_to_train the searched lr replaces train.lr
    dvc(repo, "exp", "run", "-n", "seed-1", "-S", "train.seed=1", "evaluate")
    dvc(repo, "exp", "run", "-n", "seed-2", "-S", "train.seed=2", "evaluate")
    shown = experiments(json.loads(dvc(repo, "exp", "show", "--json").stdout))
    assert {"seed-1", "seed-2"} <= set(shown), sorted(shown)
    for name, seed in (("seed-1", 1), ("seed-2", 2)):
        data = shown[name]
        assert data["params"]["params.yaml"]["data"]["train"]["seed"] == seed
        assert 0 <= metric(data, "results/train/metrics.json", "best_val_miou") <= 1
        assert 0 <= metric(data, "results/eval/metrics.json", "1", "miou") <= 1
    assert (metric(shown["seed-1"], "results/eval/metrics.json", "1", "iou")
            != metric(shown["seed-2"], "results/eval/metrics.json", "1", "iou"))
    table = dvc(repo, "exp", "show", "--no-pager", "--md").stdout
    assert "seed-1" in table and "best_val_miou" in table
    print(table)  # the closing note of the DVC workflow issue quotes it

    plots = dvc(repo, "plots", "show", "--json").stdout
    for title in ("Training curves", "Evaluated scale sets"):
        assert title in plots, plots[:2000]


def readme_set_arguments() -> list[list[str]]:
    """The `-S` arguments of every `dvc exp run` command in the README, one list per command."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    commands = re.findall(r"^dvc exp run .*$", text, flags=re.MULTILINE)
    return [re.findall(r"-S\s+('[^']*'|\S+)", command) for command in commands]


@pytest.mark.parametrize("arguments", readme_set_arguments(), ids=lambda a: " ".join(a)[:60])
def test_readme_set_examples_are_accepted(tmp_path, arguments):
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    apply_overrides(params, [a.strip("'") for a in arguments])  # what `dvc exp run -S` does to params.yaml
    load_config(params)  # and the result is a valid configuration


def test_readme_has_set_examples():
    assert len(readme_set_arguments()) >= 2
