"""End to end: `dvc repro` of the whole pipeline on a tiny configuration, in a copy of the repo."""

import json

import pytest
import yaml

from tests.dvc_helpers import dvc, tiny_repo

pytestmark = pytest.mark.e2e


def test_dvc_repro_whole_pipeline(tmp_path):
    tiny_repo(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())

    dvc(tmp_path, "repro")
    table = json.loads((tmp_path / "results/ablation/table.json").read_text())
    assert [row["method"] for row in table] == ["single", "avgpool", "maxpool", "explicit", "hierarchical",
                                                "hierarchical_05_10"]
    pair = table[-1]  # a row of its own, evaluated at the training pair: hierarchical's trainings, shared
    assert pair["fusion"] == "hierarchical" and pair["eval_scales"] == [0.5, 1.0]
    for seed in (0, 1):
        runs = {json.loads((tmp_path / f"results/ablation/{row}/seed-{seed}/run.json").read_text())["run_id"]
                for row in ("hierarchical", "hierarchical_05_10")}
        assert len(runs) == 1
    for row in table:  # every method per seed: mean and std over seeds, and a paired test against single
        assert row["seeds"] == [0, 1] and len(row["miou"]["values"]) == 2 and row["miou"]["std"] >= 0
        assert ("vs_single" in row) == (row["method"] != "single")
        if row["method"] != "single":
            low, high = row["vs_single"]["ci95"]
            assert low <= high and 0 <= row["vs_single"]["p_value"] <= 1
    assert "± " in (tmp_path / "results/ablation/table.md").read_text()
    # the budget line names the table's own model size (ablation.trunk, ablation.output_stride)
    assert "tiny at output stride 8 with deeplabv3plus" in (tmp_path / "results/ablation/table.md").read_text()
    registration = json.loads((tmp_path / "results/register/registration.json").read_text())
    assert registration["promoted"] and registration["aliases"]["champion"] == registration["version"]
    assert yaml.safe_load((tmp_path / "results/tune/best.yaml").read_text())["settings"]
    recommended = yaml.safe_load((tmp_path / "results/tune/eval_scales.yaml").read_text())["recommended"]
    assert registration["served_scales"] == recommended["scales"]  # what is served is what the search picked
    assert json.loads((tmp_path / "results/eval/metrics.json").read_text())["0.5,1,2"]["miou"] >= 0

    again = dvc(tmp_path, "repro")  # nothing changed: nothing runs
    assert "Running stage" not in again.stdout

    params["pyramid"]["scales"] = params["pyramid"]["scales"] + [2.5]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = dvc(tmp_path, "repro", "pyramid")  # only the pyramid stage reruns
    assert "Running stage 'pyramid'" in rerun.stdout and "Running stage 'prepare'" not in rerun.stdout
