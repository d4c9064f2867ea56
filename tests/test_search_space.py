"""The settings a search draws: a function of tune.seed and the sample's number, so that a larger
tune.num_samples continues a finished search with new samples and keeps the ones it has."""

from types import SimpleNamespace

import pytest

from components.config import SearchSpec, validate_config
from pipeline.runtime.search_batches import SAMPLE_BATCHES_TAG, finished_batches
from pipeline.runtime.search_space import SAMPLE, draw, search_space


def tune_section(**search) -> dict:
    return {"tune": {"seed": 3, "train_scale_sets": {"s05_10": [0.5, 1.0], "s075_10": [0.75, 1.0]},
                     "search": search}}


def trials_of(cfg, first: int, end: int) -> list[dict]:
    """The trials Tune makes of samples first .. end - 1 (its own variant generator, given the
    param space as a Tuner gives it)."""
    from ray.tune.search.variant_generator import generate_variants

    return [dict(config) for _, config in generate_variants(search_space(cfg, first, end))]


def test_a_larger_search_begins_with_the_trials_of_the_smaller_one_and_continues_with_new_ones():
    cfg = validate_config(tune_section(lr={"loguniform": [0.001, 0.1]}, train_scales={"choice": ["s05_10", "s075_10"]},
                                       crop_size={"grid": [[64, 64], [96, 96]]}), "test")
    small, large, rest = trials_of(cfg, 0, 3), trials_of(cfg, 0, 6), trials_of(cfg, 3, 6)

    def by_sample(trials):
        return sorted(trials, key=lambda t: (t[SAMPLE], t["crop_size"]))

    assert len(small) == 6 and len(large) == 12  # every grid value in every sample, as Tune's num_samples
    assert by_sample(large)[:6] == by_sample(small) and by_sample(large)[6:] == by_sample(rest)
    # the grid's values share a sample's draws; samples differ
    for sample in range(6):
        drawn = {(t["lr"], t["train_scales"]) for t in large if t[SAMPLE] == sample}
        assert len(drawn) == 1
    assert len({t["lr"] for t in large}) == 6
    assert all(0.001 <= t["lr"] <= 0.1 and t["train_scales"] in ("s05_10", "s075_10") for t in large)


def test_draws_follow_the_seed_and_the_distribution():
    spec = SearchSpec(uniform=[0.2, 0.4])
    values = [draw(spec, "aux_scale_weight", seed, sample) for seed in (0, 1) for sample in range(200)]
    assert all(0.2 <= v <= 0.4 for v in values) and len(set(values)) == 400
    assert values[:200] == [draw(spec, "aux_scale_weight", 0, sample) for sample in range(200)]
    # a log-uniform key spreads over the decades: about half the draws below the geometric middle
    lows = sum(draw(SearchSpec(loguniform=[1e-4, 1.0]), "lr", 0, sample) < 1e-2 for sample in range(400))
    assert 160 < lows < 240
    counts = [sum(draw(SearchSpec(choice=["a", "b", "c"]), "method", 0, s) == c for s in range(300)) for c in "abc"]
    assert min(counts) > 60


@pytest.mark.parametrize("tag, batches", [(None, []), ("3", [(0, 3)]), ("3,6,8", [(0, 3), (3, 6), (6, 8)])])
def test_the_search_run_records_its_finished_batches(tag, batches):
    run = SimpleNamespace(data=SimpleNamespace(tags={SAMPLE_BATCHES_TAG: tag} if tag else {}))
    assert finished_batches(run) == batches and finished_batches(None) == []
