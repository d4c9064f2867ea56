"""The ablation's seeds train side by side when the cluster has room for more than one training
(one after another where it has room for one: tests/reliability/test_kills.py, whose killed and
resumed ablation runs on such a cluster)."""

import json

import mlflow
import pytest

from tests.train_helpers import run_on_cluster, stage_command, stage_env, tiny_pyramid, write_params

pytestmark = pytest.mark.integration

RAY_HEAD_CPUS = 4  # room for four trainings of one 1-CPU worker


def ablation_params(tmp_path, cpus_per_worker: int):
    data = tiny_pyramid(tmp_path / "data")
    return write_params(tmp_path, data, ray={"num_workers": 1, "cpus_per_worker": cpus_per_worker},
                        ablation={"epochs": 2, "crop_size": [64, 64], "seeds": [0, 1], "bootstrap_rounds": 200,
                                  "output_dir": str(tmp_path / "ablation")})


def training_intervals(tmp_path) -> list[tuple[int, int]]:
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hmsa-ablation")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    return sorted((r.info.start_time, r.info.end_time) for r in runs)


def run_method(tmp_path, ray_head, params, method: str) -> str:
    command = [*stage_command("ablation", params), "run", "--method", method]
    done = run_on_cluster(command, stage_env(params, **ray_head.client_env()), 600, ray_head)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def seeds_overlap(tmp_path) -> bool:
    (_first_start, first_end), (second_start, _second_end) = training_intervals(tmp_path)
    return second_start < first_end  # overlapping runs, or one after the other


@pytest.mark.timeout(900)
def test_seeds_train_side_by_side_and_pooling_evaluates_single_scales_training(tmp_path, ray_head):
    """With room for two trainings the seeds train side by side. Average and max pooling train
    exactly what single scale trains: whichever of the three runs first trains, the others reuse its
    run and evaluate the same weights with their own fusion."""
    from safetensors.torch import load_file

    params = ablation_params(tmp_path, cpus_per_worker=1)
    outputs = {method: run_method(tmp_path, ray_head, params, method) for method in ("avgpool", "single")}
    assert "2 trainings at a time" in outputs["avgpool"] and seeds_overlap(tmp_path), outputs["avgpool"][-2000:]
    assert "reusing the finished run train-single-" not in outputs["avgpool"]  # the first trains
    assert outputs["single"].count("reusing the finished run train-single-") == 2  # one per seed
    assert len(training_intervals(tmp_path)) == 2  # two trainings (one per seed), not four
    pooled = json.loads((tmp_path / "ablation" / "avgpool" / "result.json").read_text())
    assert [r["seed"] for r in pooled["seeds"]] == [0, 1]
    for seed in (0, 1):
        folders = {m: tmp_path / "ablation" / m / f"seed-{seed}" for m in ("avgpool", "single")}
        models = {m: json.loads((f / "model" / "config.json").read_text())["model"] for m, f in folders.items()}
        assert {m: c["method"] for m, c in models.items()} == {"avgpool": "avgpool", "single": "single"}
        weights = [load_file(f / "model" / "weights.safetensors") for f in folders.values()]
        assert weights[0].keys() == weights[1].keys()
        assert all(weights[0][k].equal(weights[1][k]) for k in weights[0])
        results = {m: json.loads((f / "result.json").read_text()) for m, f in folders.items()}
        assert results["avgpool"]["eval_scales"] == [0.5, 1.0, 2.0] and results["single"]["eval_scales"] == [1.0]
        assert results["avgpool"]["miou"] >= 0 and results["single"]["miou"] >= 0
