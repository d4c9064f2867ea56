"""The ablation's seeds train side by side when the cluster has room for more than one training,
and one after another when it has room for one (a 2-core machine's local Ray)."""

import json

import mlflow
import pytest

from tests.train_helpers import run_on_cluster, stage_command, stage_env, tiny_pyramid, write_params

pytestmark = pytest.mark.integration

RAY_HEAD_CPUS = 4  # room for four trainings of one 1-CPU worker, or for one of a 4-CPU worker


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


@pytest.mark.timeout(900)
@pytest.mark.parametrize("cpus_per_worker, side_by_side", [(1, True), (4, False)])
def test_seeds_train_side_by_side_when_the_cluster_has_room(tmp_path, ray_head, cpus_per_worker, side_by_side):
    params = ablation_params(tmp_path, cpus_per_worker)
    command = [*stage_command("ablation", params), "run", "--method", "hierarchical"]
    done = run_on_cluster(command, stage_env(params, **ray_head.client_env()), 600, ray_head)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("2 trainings at a time" in done.stdout) == side_by_side, done.stdout[-2000:]
    (first_start, first_end), (second_start, second_end) = training_intervals(tmp_path)
    assert (second_start < first_end) == side_by_side  # overlapping runs, or one after the other
    result = json.loads((tmp_path / "ablation" / "hierarchical" / "result.json").read_text())
    assert [r["seed"] for r in result["seeds"]] == [0, 1] and all(r["miou"] >= 0 for r in result["seeds"])
