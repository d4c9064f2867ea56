"""Evaluation as Ray work: unseen scale sets, sharding, batching, its outputs, and the Pareto front."""

import json

import numpy as np
import pytest
import torch

from components.config import load_config
from components.data.dataset import PyramidEvalDataset
from components.data.pyramid import PyramidReader
from components.evaluation import AttentionSums, attention_means, evaluate_scale_set, interior_mask, pareto_front
from components.models import build_model
from components.significance import miou_of
from pipeline.evaluate import write_outputs
from pipeline.runtime.environment import Environment
from pipeline.runtime.eval_workers import evaluate_all
from pipeline.runtime.launch import Launch
from tests.conftest import tiny_model_config
from tests.train_helpers import tiny_pyramid, write_params


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_pyramid(tmp_path_factory.mktemp("eval"), train_images=2, val_images=5)


def setup(tmp_path, data, **ray_settings):
    # fp32: on a CPU with bf16, `precision: auto` would evaluate in bf16, and a comparison with an
    # fp32 pass would measure rounding, not sharding
    cfg = load_config(write_params(tmp_path, data, ray={"num_workers": 1, "cpus_per_worker": 1, **ray_settings},
                                   evaluate={"batch_size": 2}, train={"precision": "fp32"}))
    launch = Launch(env=Environment.from_environ({}), where="local", use_gpu=False, remote=False,
                    pyramid_uri=cfg.pyramid.output, checkpoint_root="")
    return cfg, launch


@pytest.mark.integration  # a local Ray cluster
def test_hierarchical_on_unseen_scale_sets(tmp_path, data, local_ray):
    cfg, launch = setup(tmp_path, data)
    model_cfg = tiny_model_config(num_classes=19, train_scales=[0.5, 1.0])
    model = build_model(model_cfg).eval()
    sets = [[1.0], [0.25, 0.5, 1.0, 2.0], [0.75, 1.0, 1.5]]  # 0.75 and 1.5 are not even in the pyramid
    rows = evaluate_all(cfg, model, model_cfg, sets, flip=True, launch=launch, attention=True, per_image=True)
    assert [r["scales"] for r in rows] == sets
    for r in rows:
        assert 0 <= r["miou"] <= 1 and r["latency_ms"] > 0 and set(r["iou"]) >= {"road", "pole"}
        assert r["latency_device"].startswith("CPU") and r["eval_workers"] == 1
    # Cost grows with the pixels of the set (x2 for flip).
    assert rows[1]["gflops"] > rows[2]["gflops"] > rows[0]["gflops"]
    (tmp_path / "out").mkdir()
    write_outputs(tmp_path / "out", rows, model, model_cfg, PyramidReader(cfg.pyramid.output), pictures=2)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics) == {"1", "0.25,0.5,1,2", "0.75,1,1.5"}
    # per-class IoU in its own file, so that `dvc exp show` has a column per figure, not per class
    by_class = json.loads((tmp_path / "out" / "iou_by_class.json").read_text())
    assert set(by_class) == set(metrics) and all("iou" not in row for row in metrics.values())
    assert by_class["1"] == rows[0]["iou"] and metrics["1"]["miou"] == rows[0]["miou"]
    # the registry gate's evidence: per set, one confusion matrix per val image, which sum to the
    # evaluation's own figures
    with np.load(tmp_path / "out" / "image_matrices.npz") as archive:
        assert set(archive.files) == set(metrics)
        for key, figures in metrics.items():
            assert archive[key].shape[0] == 5  # the val images, in order
            assert miou_of(archive[key].sum(0)) == pytest.approx(figures["miou"], abs=1e-9)
    attention = json.loads((tmp_path / "out" / "attention_by_class.json").read_text())
    # every scale's mean share of the fused prediction, the top one's included; per class they sum to 1
    assert set(attention) == {"0.25", "0.5", "1", "2"} and 0 <= attention["0.5"]["road"] <= 1
    for name, value in attention["1"].items():
        if value is not None:
            assert abs(sum(attention[s][name] for s in attention) - 1) < 1e-4, name
    # inside regions and on their boundaries: shares sum to 1 as well, and over all pixels a class's
    # share lies between the two (it is their pixel-weighted mean)
    regions = json.loads((tmp_path / "out" / "attention_by_region.json").read_text())
    assert set(regions) == {"interior", "boundary"} and all(set(regions[r]) == set(attention) for r in regions)
    for name, value in attention["1"].items():
        parts = [regions[r]["1"][name] for r in regions if regions[r]["1"][name] is not None]
        if value is not None:
            assert min(parts) - 1e-6 <= value <= max(parts) + 1e-6, name
        for region in regions:
            if regions[region]["1"][name] is not None:
                assert abs(sum(regions[region][s][name] for s in attention) - 1) < 1e-4, (region, name)
    assert len(list((tmp_path / "out" / "attention").glob("*.png"))) == 2
    assert (tmp_path / "out" / "pareto.csv").read_text().startswith("scales,gflops,miou")


def test_an_image_is_read_once_and_run_once_per_distinct_scale_of_all_the_sets(data):
    """Three sets over 0.5, 1.0 and 2.0 (six passes if each set ran alone): each val image is read
    once and the segmenter runs once per scale (twice with flip); every set's figures are those it
    gets evaluated alone, and its seconds are those of its own scales."""
    from components.evaluation import evaluate_shard

    model = build_model(tiny_model_config(num_classes=19, train_scales=[0.5, 1.0])).eval()
    reader = PyramidReader(str(data / "pyramid"))
    sets = [[1.0], [0.5, 1.0], [0.5, 1.0, 2.0]]
    reads, passes = [], []

    class CountedReads(PyramidEvalDataset):
        def __getitem__(self, index: int) -> dict:
            reads.append(index)
            return super().__getitem__(index)

    dataset = CountedReads(reader, "val", [0.5, 1.0, 2.0])
    model.segmenter.register_forward_hook(lambda *_: passes.append(1))
    indices = list(range(len(dataset)))
    results = evaluate_shard(model, dataset, indices, sets, 19, flip=True, batch_size=len(indices))
    assert sorted(reads) == indices and len(passes) == 2 * 3  # one batch: 3 scales, and their flips
    for scales, result in zip(sets, results, strict=True):
        (alone,) = evaluate_shard(model, dataset, indices, [scales], 19, flip=True, batch_size=len(indices))
        assert np.array_equal(result["matrix"], alone["matrix"]), scales
        assert np.array_equal(result["image_matrices"], alone["image_matrices"]), scales
        assert result["seconds"] > 0 and result["images"] == len(indices)
    assert results[0]["seconds"] < results[2]["seconds"]  # 1.0 alone costs less than 0.5, 1.0 and 2.0


@pytest.mark.integration  # a local Ray cluster
def test_shards_and_batches_give_the_metrics_of_one_pass(tmp_path, data, local_ray):
    """Three workers with batches of two against one image at a time in this process: the same
    confusion matrices, so the same IoU to the last bit."""
    cfg, launch = setup(tmp_path, data, num_workers=[1, 3])
    model_cfg = tiny_model_config(num_classes=19, train_scales=[0.5, 1.0])
    model = build_model(model_cfg).eval()
    sets = [[1.0], [0.5, 1.0, 2.0]]
    rows = evaluate_all(cfg, model, model_cfg, sets, flip=False, launch=launch)
    assert rows[0]["eval_workers"] == 3
    reader = PyramidReader(cfg.pyramid.output)
    for scales, row in zip(sets, rows, strict=True):
        with torch.no_grad():
            alone = evaluate_scale_set(model, PyramidEvalDataset(reader, "val", scales), scales,
                                       reader.manifest["classes"])
        assert row["iou"] == alone["iou"] and row["miou"] == alone["miou"]


@pytest.mark.integration  # a local Ray cluster
def test_a_scale_set_the_method_cannot_use_fails_before_work(tmp_path, data, local_ray):
    cfg, launch = setup(tmp_path, data)
    model_cfg = tiny_model_config(method="explicit", num_classes=19, train_scales=[0.5, 1.0])
    with pytest.raises(ValueError, match="training scales"):
        evaluate_all(cfg, build_model(model_cfg).eval(), model_cfg, [[0.5, 1.0], [1.0]], flip=False, launch=launch)


def test_pareto_front():
    rows = [{"gflops": 1, "miou": 0.5}, {"gflops": 2, "miou": 0.4}, {"gflops": 3, "miou": 0.6},
            {"gflops": 3, "miou": 0.6}]
    assert pareto_front(rows) == [True, False, True, True]


def test_attention_by_region_separates_region_interiors_from_boundaries():
    """A 48x48 square of class 1 on class 0 in a 96x96 image (band: 96 / 24 = 4 px): the pixels
    within 4 px of the square's edge, on either side, are boundary; the image's border is not. An
    attention map that gives scale 2.0 the boundary and scale 0.5 the rest reads as exactly that."""
    label = torch.zeros(96, 96, dtype=torch.long)
    label[24:72, 24:72] = 1
    label[0, 0] = 255  # ignored: a neighbour of another label, and not counted itself
    interior = interior_mask(label)
    assert interior[48, 48] and interior[10, 48] and interior[90, 90] and not interior[1, 1]
    assert not interior[20, 48] and not interior[27, 48] and interior[19, 48] and interior[29, 48]
    high = (~interior).float()[None, None]
    sums = AttentionSums([0.5, 2.0], num_classes=2)
    sums.add({0.5: 1 - high, 2.0: high}, [label])
    means = attention_means({"attention_sums": sums.sums, "attention_counts": sums.counts})
    for cls in (0, 1):
        assert means["interior"][2.0][cls] == 0 and means["interior"][0.5][cls] == 1
        assert means["boundary"][2.0][cls] == 1 and means["boundary"][0.5][cls] == 0
        assert 0 < means["all"][2.0][cls] < 1
    assert sums.counts["all"].sum() == 96 * 96 - 1
