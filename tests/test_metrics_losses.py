import math

import numpy as np
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
    cm.update(torch.tensor([5, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="1 pixels with class ids outside"):  # raised where the counts are read
        cm.miou()


def test_confusion_matrix_update_never_waits_for_the_device(monkeypatch):
    """An evaluation batch adds to counts kept on the predictions' device: nothing in update() reads
    a value on the host (a GPU would stop there for every batch), and ignored pixels, even with ids
    out of range, are not counted."""
    pred, target = torch.randint(0, 3, (2, 8, 8)), torch.randint(0, 3, (2, 8, 8))
    target[0, 0] = 255
    expected = ConfusionMatrix(3)
    for p, t in zip(pred.reshape(-1).tolist(), target.reshape(-1).tolist(), strict=True):
        if t != 255:
            expected.matrix[t, p] += 1
    cm = ConfusionMatrix(3)

    def host_read(*_args, **_kwargs):
        raise AssertionError("update() read a value on the host")

    with monkeypatch.context() as patched:
        for method in ("__bool__", "item", "tolist", "cpu", "numpy"):
            patched.setattr(torch.Tensor, method, host_read)
        cm.update(pred, target)
        cm.update(pred, target)
    assert torch.equal(cm.matrix, expected.matrix * 2)


def test_cross_entropy_ignores_255_and_survives_empty_batches():
    logits = torch.zeros(1, 2, 1, 2, requires_grad=True)
    target = torch.tensor([[[0, 255]]])
    assert cross_entropy(logits, target).item() == pytest.approx(math.log(2))
    empty = cross_entropy(logits, torch.full((1, 1, 2), 255))
    assert empty.item() == 0 and empty.requires_grad


def test_cross_entropy_reads_channels_last_logits_in_place():
    """Channels-last logits (how training runs) give the same loss and gradient as NCHW ones, and
    neither the loss nor its gradient copies them to another layout (PyTorch's cross-entropy over
    dimension 1 does, for NCHW logits too)."""
    torch.manual_seed(0)
    target = torch.randint(0, 5, (2, 32, 32))
    target[:, :4] = 255
    values = torch.randn(2, 5, 16, 16)
    results = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        logits = values.detach().contiguous(memory_format=layout).requires_grad_()
        with torch.profiler.profile() as prof:
            loss = cross_entropy(logits, target)
            loss.backward()
        results[layout] = (loss.detach(), logits.grad)
        copies = [e.key for e in prof.key_averages() if e.key in ("aten::contiguous", "aten::clone")]
        assert not copies or layout is torch.contiguous_format, copies
    (loss_nchw, grad_nchw), (loss_nhwc, grad_nhwc) = results.values()
    torch.testing.assert_close(loss_nhwc, loss_nchw)
    torch.testing.assert_close(grad_nhwc, grad_nchw)


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


def rmi_by_hand(onehot: np.ndarray, probs: np.ndarray, radius: int = 3, ridge: float = 5e-4) -> np.ndarray:
    """The RMI bound of one class map pair per image, written out: every radius x radius window as a
    vector (pixel loops), covariances from centred vectors, the Schur complement, 0.5 log det."""
    n, c, h, w = onehot.shape
    out = np.zeros((n, c))
    for i in range(n):
        for k in range(c):
            ys, ps = [], []
            for top in range(h - radius + 1):
                for left in range(w - radius + 1):
                    ys.append(onehot[i, k, top:top + radius, left:left + radius].reshape(-1))
                    ps.append(probs[i, k, top:top + radius, left:left + radius].reshape(-1))
            y, p = np.array(ys).T, np.array(ps).T  # (radius^2, positions)
            y = y - y.mean(axis=1, keepdims=True)
            p = p - p.mean(axis=1, keepdims=True)
            eye = ridge * np.eye(radius * radius)
            var = y @ y.T - (y @ p.T) @ np.linalg.inv(p @ p.T + eye) @ (y @ p.T).T
            out[i, k] = 0.5 * np.linalg.slogdet(var + eye)[1]
    return out.mean(axis=0) / radius ** 2


def test_rmi_bound_matches_a_hand_computation():
    from components.losses import rmi_lower_bound

    rng = np.random.default_rng(0)
    onehot = (rng.random((2, 3, 7, 8)) < 0.4).astype(np.float64)
    probs = np.clip(0.7 * onehot + 0.3 * rng.random((2, 3, 7, 8)), 1e-6, 1)
    ours = rmi_lower_bound(torch.from_numpy(onehot), torch.from_numpy(probs)).numpy()
    assert np.allclose(ours, rmi_by_hand(onehot, probs), rtol=1e-4, atol=1e-5)


def test_rmi_loss_prefers_the_truth_and_ignores_ignored_pixels():
    from components.losses import rmi_loss

    torch.manual_seed(0)
    target = torch.randint(0, 4, (2, 24, 24))
    target[:, :4] = 255
    truth = torch.nn.functional.one_hot(torch.where(target == 255, 0, target), 4).permute(0, 3, 1, 2).float()
    good, noise = truth * 8 - 4, torch.randn(2, 4, 24, 24, requires_grad=True)
    assert rmi_loss(good, target) < rmi_loss(noise, target)
    rmi_loss(noise, target).backward()
    assert torch.isfinite(noise.grad).all() and noise.grad[:, :, :4].abs().max() < 1e-3  # only via pooling edges
    changed = good.clone()
    changed[:, :, :3] = torch.randn(2, 4, 3, 24) * 5  # ignored rows (away from the pooling seam) do not count
    assert torch.allclose(rmi_loss(changed, target), rmi_loss(good, target), atol=1e-5)


def test_rmi_replaces_cross_entropy_on_the_fused_logits_only():
    cfg = tiny_model_config(method="hierarchical", aux_scale_weight=0.05)
    target = torch.randint(0, 5, (2, 16, 16))
    out = MultiScaleOutput(fused=torch.randn(2, 5, 16, 16), logits={0.5: torch.randn(2, 5, 8, 8),
                                                                    1.0: torch.randn(2, 5, 16, 16)})
    from components.losses import rmi_loss

    per_scale = sum(0.05 * cross_entropy(logits, target) for logits in out.logits.values())
    assert torch.allclose(segmentation_loss(out, target, cfg, "rmi"), rmi_loss(out.fused, target) + per_scale)
    assert torch.allclose(segmentation_loss(out, target, cfg, "ce"), cross_entropy(out.fused, target) + per_scale)


def test_a_training_history_is_summarized_from_its_epochs():
    from components.training import summarize_history

    epoch = {"val_miou": 0.1, "loss": 2.0, "images_per_s": 10.0, "epoch_seconds": 4.0, "step_seconds": 0.5,
             "peak_memory_mb": 100.0, "replicas_in_sync": True, "workers": 2, "nodes": ["b", "a"]}
    later = {**epoch, "val_miou": 0.3, "loss": 1.0, "images_per_s": 20.0, "epoch_seconds": 2.0, "step_seconds": 0.25,
             "peak_memory_mb": 150.0, "workers": 1, "nodes": ["a"]}
    assert summarize_history([epoch, later]) == {
        "final_val_miou": 0.3, "final_loss": 1.0, "epochs": 2, "images_per_s": 15.0, "epoch_seconds": 3.0,
        "step_seconds": 0.375, "peak_memory_mb": 150.0, "replicas_in_sync": True, "workers_per_epoch": [2, 1],
        "worker_nodes": ["a", "b"]}
    assert summarize_history([epoch, {**later, "replicas_in_sync": False}])["replicas_in_sync"] is False


def test_cuda_training_autotunes_convolutions_and_steps_the_optimizer_fused():
    """What a CUDA worker gets (set without a GPU: the flag and the optimizer's choice): cuDNN's
    autotuner for the fixed crop shapes, and the fused SGD step; a CPU worker keeps torch's default."""
    from components.config import TrainConfig
    from components.training import build_optimizer, prepare_device

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    assert build_optimizer(model, TrainConfig(), "cuda").defaults["fused"] is True
    assert not build_optimizer(model, TrainConfig(), "cpu").defaults["fused"]
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        prepare_device(torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is False
        prepare_device(torch.device("cuda"))
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before
