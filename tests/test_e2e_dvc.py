"""End to end: `dvc repro` of the whole pipeline on a tiny configuration, in a copy of the repo, and
then DVC as its users drive it there: `dvc exp run -S`, `dvc exp show`, `dvc plots show`, a params
edit that reruns only the stage it belongs to, and the `-S` examples of the README and docs/."""

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


def commit(repo, message: str) -> None:
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], cwd=repo, check=True)


def experiments(show: list[dict]) -> dict[str, dict]:
    """Experiment name -> its data (params, metrics) from `dvc exp show --json`."""
    found = {}
    for commit_entry in show:
        for experiment in commit_entry.get("experiments") or []:
            for rev in experiment["revs"]:
                found[rev["name"]] = rev["data"]
    return found


def metric(data: dict, file: str, *keys: str):
    value = data["metrics"][file]["data"]
    for key in keys:
        value = value[key]
    return value


def stages_run(done: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", done.stdout)


def check_whole_pipeline_outputs(repo) -> None:
    table = json.loads((repo / "results/ablation/table.json").read_text())
    assert [row["method"] for row in table] == ["single", "avgpool", "maxpool", "explicit", "hierarchical",
                                                "hierarchical_05_10"]
    pair = table[-1]  # a row of its own, evaluated at the training pair: hierarchical's trainings, shared
    assert pair["fusion"] == "hierarchical" and pair["eval_scales"] == [0.5, 1.0]
    for seed in (0, 1):
        runs = {json.loads((repo / f"results/ablation/{row}/seed-{seed}/run.json").read_text())["run_id"]
                for row in ("hierarchical", "hierarchical_05_10")}
        assert len(runs) == 1
    for row in table:  # every method per seed: mean and std over seeds, and a paired test against single
        assert row["seeds"] == [0, 1] and len(row["miou"]["values"]) == 2 and row["miou"]["std"] >= 0
        assert ("vs_single" in row) == (row["method"] != "single")
        if row["method"] != "single":
            low, high = row["vs_single"]["ci95"]
            assert low <= high and 0 <= row["vs_single"]["p_value"] <= 1
    markdown = (repo / "results/ablation/table.md").read_text()
    assert "± " in markdown
    # the budget line names the table's own model size (ablation.trunk, ablation.output_stride)
    assert "tiny at output stride 8 with deeplabv3plus" in markdown
    registration = json.loads((repo / "results/register/registration.json").read_text())
    assert registration["promoted"] and registration["aliases"]["champion"] == registration["version"]
    assert yaml.safe_load((repo / "results/tune/best.yaml").read_text())["settings"]
    recommended = yaml.safe_load((repo / "results/eval_scales/recommended.yaml").read_text())["recommended"]
    assert registration["served_scales"] == recommended["scales"]  # what is served is what the search picked
    assert json.loads((repo / "results/eval/metrics.json").read_text())["0.5,1,2"]["miou"] >= 0


def check_ablation_seeds_side_by_side_and_shared_trainings(repo, output: str) -> None:
    """The stage's local Ray (2 CPUs, 1 per worker in the tiny params) has room for two trainings:
    a method's seeds train side by side (one after another where there is room for one:
    tests/reliability/test_kills.py). Average and max pooling train exactly what single scale
    trains: they reuse its runs and evaluate the same weights with their own fusion."""
    import mlflow
    from safetensors.torch import load_file

    assert "ablation single: 2 seeds, 2 trainings at a time" in output, output[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hmsa-ablation")
    single = client.search_runs([experiment.experiment_id], filter_string="tags.method = 'single'")
    assert [r.info.status for r in single] == ["FINISHED", "FINISHED"]  # two trainings (one per seed), not six
    (_first_start, first_end), (second_start, _second_end) = sorted((r.info.start_time, r.info.end_time)
                                                                    for r in single)
    assert second_start < first_end  # side by side
    assert output.count("reusing the finished run train-single-") == 4  # per seed, by avgpool and maxpool
    for pooling in ("avgpool", "maxpool"):
        for seed in (0, 1):
            folders = {m: repo / "results/ablation" / m / f"seed-{seed}" for m in (pooling, "single")}
            models = {m: json.loads((f / "model" / "config.json").read_text())["model"] for m, f in folders.items()}
            assert {m: c["method"] for m, c in models.items()} == {pooling: pooling, "single": "single"}
            weights = [load_file(f / "model" / "weights.safetensors") for f in folders.values()]
            assert weights[0].keys() == weights[1].keys() and all(weights[0][k].equal(weights[1][k])
                                                                  for k in weights[0])
            results = {m: json.loads((f / "result.json").read_text()) for m, f in folders.items()}
            assert results[pooling]["eval_scales"] == [0.5, 1.0, 2.0] and results["single"]["eval_scales"] == [1.0]


@pytest.mark.timeout(1500)
def test_dvc_repro_whole_pipeline_then_experiments_plots_and_a_params_edit(tmp_path):
    repo = tiny_repo(tmp_path)
    commit(repo, "tiny")

    done = dvc(repo, "repro")
    check_whole_pipeline_outputs(repo)
    check_ablation_seeds_side_by_side_and_shared_trainings(repo, done.stdout)
    assert "training the tuned settings" in done.stdout  # train took the search's best.yaml (lr below)
    # Ray's warning that it turned token authentication on, on every start of a stage's own local
    # instance (loopback only, ended with the stage), is left out of the log
    assert "Token authentication is enabled" not in done.stdout + done.stderr
    again = dvc(repo, "repro")  # nothing changed: nothing runs
    assert stages_run(again) == []
    commit(repo, "repro")

    # Edits that change no training (fault tolerance, loader processes, the MLflow experiment, an
    # inference-only key) leave the search and the trainings up to date in DVC's own eyes; a
    # training setting of the train stage alone reruns that stage (tests/test_stage_params.py).
    original = (repo / "params.yaml").read_text()
    edited = yaml.safe_load(original)
    edited["ray"]["max_failures"] += 1
    edited["loader"]["workers"] = 1
    edited["mlflow"]["experiment"] = "elsewhere"
    edited["eval_scales"]["max_gflops"] = 1000.0
    edited["train"]["epochs"] += 1
    (repo / "params.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    stale = set(json.loads(dvc(repo, "status", "--json").stdout))
    assert "train" in stale and not {stage for stage in stale if stage == "tune" or stage.startswith("ablation")}, stale
    (repo / "params.yaml").write_text(original)

    # An experiment from the reproduced commit: an evaluate setting reruns evaluate alone, and the
    # experiment and the commit it started from each keep their own params and metrics.
    pair = dvc(repo, "exp", "run", "-n", "pair", "-S", "evaluate.scale_sets=[[1.0],[0.5,1.0]]", "evaluate")
    assert stages_run(pair) == ["evaluate"], pair.stdout[-2000:]
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    (baseline,) = [entry["data"] for entry in shown if "pair" in experiments([entry])]
    tuned = yaml.safe_load((repo / "results/tune/best.yaml").read_text())["settings"]
    for data, widest in ((experiments(shown)["pair"], "0.5,1"), (baseline, "0.5,1,2")):
        assert data["params"]["params.yaml"]["data"]["evaluate"]["scale_sets"][-1] == [float(s) for s in
                                                                                       widest.split(",")]
        assert set(metric(data, "results/eval/metrics.json")) == {"1", "0.5,1", widest}
        assert 0 <= metric(data, "results/eval/metrics.json", widest, "miou") <= 1
        assert 0 <= metric(data, "results/train/metrics.json", "best_val_miou") <= 1
        # the settings the search chose, as trained, are columns; per-class IoU is not
        assert metric(data, "results/train/metrics.json", "trained_with", "lr") == tuned["lr"]
        assert "iou" not in metric(data, "results/eval/metrics.json", widest)
    table = dvc(repo, "exp", "show", "--no-pager", "--md").stdout
    assert "pair" in table and "best_val_miou" in table
    plots = dvc(repo, "plots", "show", "--json").stdout
    for title in ("Training curves", "Evaluated scale sets"):
        assert title in plots, plots[:2000]

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pyramid"]["scales"] = params["pyramid"]["scales"] + [2.5]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = dvc(repo, "repro", "pyramid")  # only the pyramid stage reruns
    assert stages_run(rerun) == ["pyramid"]


def readme_set_arguments() -> list[list[str]]:
    """The `-S` arguments of every `dvc exp run` command in the README and docs/, one list per command."""
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    text = text.replace("\\\n", " ")
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
