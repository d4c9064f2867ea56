"""hierarchical_fuse and the pooling fusions against hand computations."""

import pytest
import torch

from components.models.fusion import avg_fuse, explicit_fuse, hierarchical_fuse, max_fuse


def size_at(scale, base=(97, 131)):
    return max(1, round(base[0] * scale)), max(1, round(base[1] * scale))


def constant_inputs(values, attn_values, base=(97, 131), classes=3):
    """Spatially constant maps: resizing leaves them unchanged, so the fused value is a closed form."""
    logits = {s: torch.full((2, classes, *size_at(s, base)), float(v)) for s, v in values.items()}
    attn = {s: torch.full((2, 1, *size_at(s, base)), float(a)) for s, a in attn_values.items()}
    return logits, attn


def test_two_scales_is_the_training_rule():
    logits, attn = constant_inputs({0.5: 2.0, 1.0: -1.0}, {0.5: 0.25, 1.0: 0.9})
    out = hierarchical_fuse(logits, attn)
    # out = a_0.5 * p_0.5 + (1 - a_0.5) * p_1.0 = 0.25*2 + 0.75*(-1)
    assert out.shape == (2, 3, 97, 131)
    assert torch.allclose(out, torch.full_like(out, 0.25 * 2 + 0.75 * -1))


@pytest.mark.parametrize(
    "scales",
    [(0.5, 1.0, 2.0), (0.25, 0.5, 1.0, 2.0), (0.5, 1.0, 1.5), (0.25, 0.5, 1.0, 1.5, 2.0), (1.0, 2.0)],
)
def test_hand_computed_chain(scales):
    p = {s: 1.0 + 3 * i for i, s in enumerate(scales)}
    a = {s: 0.1 + 0.15 * i for i, s in enumerate(scales)}
    logits, attn = constant_inputs(p, a)
    # Walk the scales from the top down, by hand.
    order = sorted(scales, reverse=True)
    expected = p[order[0]]
    for s in order[1:]:
        expected = a[s] * p[s] + (1 - a[s]) * expected
    out = hierarchical_fuse(logits, attn)
    assert out.shape == (2, 3, 97, 131)
    assert torch.allclose(out, torch.full_like(out, expected), atol=1e-5)


def test_top_scale_attention_is_unused():
    logits, attn = constant_inputs({0.5: 1.0, 1.0: 2.0, 2.0: 5.0}, {0.5: 0.3, 1.0: 0.6, 2.0: 0.0})
    a = hierarchical_fuse(logits, attn)
    attn[2.0] = torch.rand_like(attn[2.0])
    assert torch.equal(a, hierarchical_fuse(logits, attn))


def test_spatially_varying_high_scale_is_resized_down():
    """With a_1.0 = 0 the 1.0 output is the 2.0 prediction resized (bilinear) to the 1.0 grid."""
    torch.manual_seed(1)
    hi = torch.arange(4 * 6, dtype=torch.float32).reshape(1, 1, 4, 6)
    logits = {1.0: torch.zeros(1, 1, 2, 3), 2.0: hi}
    attn = {1.0: torch.zeros(1, 1, 2, 3), 2.0: torch.zeros(1, 1, 4, 6)}
    out = hierarchical_fuse(logits, attn)
    # Bilinear 2x downsampling with align_corners=False averages each 2x2 block.
    expected = hi.reshape(1, 1, 2, 2, 3, 2).mean(dim=(3, 5))
    assert torch.allclose(out, expected)


def test_low_scale_with_full_attention_replaces_prediction():
    """a_0.5 = 1: the 0.5 prediction, upsampled, replaces whatever came from above."""
    low = torch.tensor([[[[1.0, 3.0]]]])  # (1,1,1,2) -> 1.0 grid (2,4)
    logits = {0.5: low, 1.0: torch.full((1, 1, 2, 4), 100.0)}
    attn = {0.5: torch.ones(1, 1, 1, 2), 1.0: torch.zeros(1, 1, 2, 4)}
    out = hierarchical_fuse(logits, attn)
    # Bilinear upsampling (align_corners=False) of [1, 3] to width 4: [1, 1.5, 2.5, 3].
    assert torch.allclose(out[0, 0, 0], torch.tensor([1.0, 1.5, 2.5, 3.0]))
    assert torch.allclose(out[0, 0, 0], out[0, 0, 1])


def test_errors_name_the_problem():
    logits, attn = constant_inputs({0.5: 1.0, 2.0: 1.0}, {0.5: 0.5, 2.0: 0.5})
    with pytest.raises(ValueError, match="1.0"):
        hierarchical_fuse(logits, attn)
    logits, attn = constant_inputs({0.5: 1.0, 1.0: 1.0}, {1.0: 0.5})
    with pytest.raises(ValueError, match="same scales"):
        hierarchical_fuse(logits, attn)


def test_avg_and_max_fuse():
    logits, _ = constant_inputs({0.5: 1.0, 1.0: 4.0, 2.0: -2.0}, {})
    assert torch.allclose(avg_fuse(logits), torch.full((2, 3, 97, 131), 1.0))
    assert torch.allclose(max_fuse(logits), torch.full((2, 3, 97, 131), 4.0))


def test_explicit_fuse_softmax_over_scales():
    logits, _ = constant_inputs({0.5: 1.0, 1.0: 4.0}, {})
    scores = torch.zeros(2, 2, 97, 131)
    scores[:, 1] = torch.log(torch.tensor(3.0))  # weights 1/4 and 3/4
    out = explicit_fuse(logits, scores)
    assert torch.allclose(out, torch.full_like(out, 0.25 * 1 + 0.75 * 4), atol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        explicit_fuse(logits, torch.zeros(2, 3, 97, 131))


@pytest.mark.parametrize("scales", [(0.5, 1.0), (0.5, 1.0, 2.0), (0.25, 0.5, 1.0, 2.0), (1.0, 1.5, 2.0)])
def test_effective_weights_unroll_the_recursion_and_sum_to_one(scales):
    """w_s = a_s * prod_{s' < s} (1 - a_s'), a_top = 1: with spatially constant maps the fused logits
    are exactly sum_s w_s p_s; with random maps the weights still sum to 1 at every pixel."""
    from components.models.fusion import hierarchical_weights

    p = {s: 1.0 + 3 * i for i, s in enumerate(scales)}
    a = {s: 0.1 + 0.15 * i for i, s in enumerate(scales)}
    logits, attn = constant_inputs(p, a)
    weights = hierarchical_weights(attn, list(scales), (97, 131))
    assert sorted(weights) == sorted(scales)
    fused = hierarchical_fuse(logits, attn)
    assert torch.allclose(fused, sum(weights[s] * p[s] for s in scales).expand_as(fused), atol=1e-5)
    # by hand for (0.5, 1.0, 2.0): w_0.5 = a_0.5, w_1 = (1 - a_0.5) a_1, w_2 = (1 - a_0.5)(1 - a_1)
    if scales == (0.5, 1.0, 2.0):
        expected = {0.5: a[0.5], 1.0: (1 - a[0.5]) * a[1.0], 2.0: (1 - a[0.5]) * (1 - a[1.0])}
        assert all(torch.allclose(weights[s], torch.full_like(weights[s], v)) for s, v in expected.items())
    random = {s: torch.rand(2, 1, *size_at(s)) for s in scales[:-1]}  # the top map is never read
    total = sum(hierarchical_weights(random, list(scales), (97, 131)).values())
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


def test_model_output_reports_shares_of_the_prediction():
    from components.models import build_model
    from tests.conftest import tiny_model_config

    for method in ("hierarchical", "explicit"):
        model = build_model(tiny_model_config(method=method, train_scales=[0.5, 1.0, 2.0] if method == "explicit"
                                              else [0.5, 1.0])).eval()
        with torch.no_grad():
            output = model(torch.randn(1, 3, 64, 64), [0.5, 1.0, 2.0])
        weights = output.scale_weights()
        assert sorted(weights) == [0.5, 1.0, 2.0]  # the top scale has its share too
        assert all(w.shape == (1, 1, 64, 64) for w in weights.values())
        assert torch.allclose(sum(weights.values()), torch.ones(1, 1, 64, 64), atol=1e-5)
