import math

import pytest
import torch

from components.losses import cross_entropy, segmentation_loss
from components.metrics import ConfusionMatrix
from components.models.multiscale import MultiScaleOutput
from tests.conftest import tiny_model_config


def test_confusion_matrix_by_hand():
    cm = ConfusionMatrix(num_classes=4)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 3]])
    cm.update(pred, target)
    iou = cm.iou()
    # class 0: tp 1, fp 1 (a 2 predicted 0), fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: 1/2.
    assert torch.allclose(iou[:3], torch.tensor([1 / 3, 2 / 3, 1 / 2], dtype=torch.float64))
    assert math.isnan(iou[3])  # predicted only on ignored pixels, absent from target: NaN
    assert cm.miou() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert cm.miou(classes=[1, 2]) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_merge_equals_one_big_update():
    a, b, both = ConfusionMatrix(3), ConfusionMatrix(3), ConfusionMatrix(3)
    p1, t1 = torch.randint(0, 3, (50,)), torch.randint(0, 3, (50,))
    p2, t2 = torch.randint(0, 3, (70,)), torch.randint(0, 3, (70,))
    a.update(p1, t1)
    b.update(p2, t2)
    both.update(torch.cat([p1, p2]), torch.cat([t1, t2]))
    assert torch.equal(a.merge(b).matrix, both.matrix)
    assert torch.equal(a.all_reduce().matrix, both.matrix)  # no process group: unchanged


def test_confusion_matrix_rejects_bad_input():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([5]), torch.tensor([0]))


def test_cross_entropy_ignores_255_and_survives_empty_batches():
    logits = torch.zeros(1, 2, 1, 2, requires_grad=True)
    target = torch.tensor([[[0, 255]]])
    assert cross_entropy(logits, target).item() == pytest.approx(math.log(2))
    empty = cross_entropy(logits, torch.full((1, 1, 2), 255))
    assert empty.item() == 0 and empty.requires_grad


def test_auxiliary_terms_by_method():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    fused = torch.zeros(1, 2, 4, 4)
    per_scale = {0.5: torch.zeros(1, 2, 2, 2), 1.0: torch.zeros(1, 2, 4, 4)}
    out = MultiScaleOutput(fused=fused, logits=per_scale)
    base = math.log(2)
    hier = tiny_model_config(method="hierarchical", aux_scale_weight=0.05)
    assert segmentation_loss(out, target, hier).item() == pytest.approx(base * (1 + 2 * 0.05))
    explicit = tiny_model_config(method="explicit", explicit_scale_weight=1.0)
    assert segmentation_loss(out, target, explicit).item() == pytest.approx(base * 3)
    single = tiny_model_config(method="avgpool")
    assert segmentation_loss(out, target, single).item() == pytest.approx(base)
