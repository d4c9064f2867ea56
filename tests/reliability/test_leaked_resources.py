"""A killed run must not leave the cluster unable to run the next one.

A driver killed while its training starts can leave a placement group that Ray never frees (see
`pipeline.cluster.free_placement_groups_of_ended_jobs`); it holds its CPUs for ever, and every later
stage on that cluster waits for them. Every stage that joins a cluster frees such groups first."""

from __future__ import annotations

import pytest

from tests.services import RayHead
from tests.train_helpers import run_on_cluster, stage_command, stage_env, tiny_pyramid, write_params

pytestmark = pytest.mark.integration


@pytest.fixture
def own_cluster():
    """A cluster of its own: a leaked group left behind by a failure here must not stall other tests."""
    head = RayHead(num_cpus=2)
    yield head
    head.stop()


def test_a_stage_frees_the_cpus_a_killed_run_left_reserved(tmp_path, own_cluster):
    from components.models import build_model, save_model
    from tests.conftest import tiny_model_config

    leaked = own_cluster.leak_placement_group(cpus=2)  # every CPU of the cluster
    assert own_cluster.placement_group_states()[leaked] == "CREATED"

    data = tiny_pyramid(tmp_path / "data")
    cfg = tiny_model_config(num_classes=19)
    save_model(build_model(cfg).eval(), cfg, tmp_path / "model")
    params = write_params(tmp_path, data, evaluate={"model": str(tmp_path / "model"), "pictures": 0,
                                                    "output_dir": str(tmp_path / "eval"), "scale_sets": [[1.0]]})
    # Without the cleanup the evaluation's workers wait for the leaked CPUs for ever.
    done = run_on_cluster(stage_command("evaluate", params), stage_env(params, **own_cluster.client_env()),
                          timeout=300, cluster=own_cluster)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "freed 1 placement group(s) that ended jobs still held" in done.stdout
    assert own_cluster.placement_group_states()[leaked] == "REMOVED"
    assert (tmp_path / "eval" / "metrics.json").is_file()
