"""Every method x decoder trains a step on 64x64; trunks match torchvision; hierarchical generalises."""

import os
import re

import pytest
import torch

from components.config import METHODS
from components.losses import segmentation_loss
from components.models import build_model, load_saved_model, save_model
from components.models.decoders import DECODERS
from components.models.trunks import TRUNKS, load_pretrained_trunk
from tests.conftest import tiny_model_config


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("method", METHODS)
def test_forward_backward(method, decoder):
    cfg = tiny_model_config(method=method, decoder=decoder)
    model = build_model(cfg).train()
    image = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 5, (2, 64, 64))
    target[:, :4] = 255
    out = model(image)
    assert out.fused.shape == (2, 5, 64, 64)
    assert set(out.logits) == set(cfg.train_scales)
    loss = segmentation_loss(out, target, cfg)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.segmenter.trunk.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    if method == "hierarchical":
        # The 0.5 attention head must receive gradient from the fused loss.
        assert model.segmenter.attn_head.net[0].weight.grad.abs().sum() > 0
    if method == "explicit":
        assert model.explicit_attention.net[0].weight.grad.abs().sum() > 0


def test_hierarchical_evaluates_on_unseen_scale_sets():
    cfg = tiny_model_config(method="hierarchical", train_scales=[0.5, 1.0])
    model = build_model(cfg).eval()
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for scales in ([1.0], [0.25, 0.5, 1.0, 1.5, 2.0], [0.75, 1.0, 1.25]):
            out = model(image, scales)
            assert out.fused.shape == (1, 5, 64, 96)
            assert sorted(out.attention) == sorted(scales)[:-1]  # the top scale's attention is never used
            assert out.logits[2.0 if 2.0 in scales else max(scales)].shape[-2] == round(64 * max(scales))


def test_scale_sets_a_method_cannot_use_are_rejected():
    single = build_model(tiny_model_config(method="single")).eval()
    with pytest.raises(ValueError, match="single"):
        single(torch.randn(1, 3, 32, 32), [0.5, 1.0])
    explicit = build_model(tiny_model_config(method="explicit", train_scales=[0.5, 1.0])).eval()
    with pytest.raises(ValueError, match="training scales"):
        explicit(torch.randn(1, 3, 32, 32), [0.5, 1.0, 2.0])
    hier = build_model(tiny_model_config()).eval()
    with pytest.raises(ValueError, match="1.0"):
        hier(torch.randn(1, 3, 32, 32), [0.5, 2.0])


def test_pyramid_input_uses_given_levels():
    model = build_model(tiny_model_config()).eval()
    base = torch.randn(1, 3, 64, 64)
    low = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        from_pyramid = model({1.0: base, 0.5: low}).fused
        resized = model(base).fused
    assert not torch.allclose(from_pyramid, resized)
    with torch.no_grad():
        assert torch.allclose(model({1.0: base}).fused, resized)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_resnet_output_stride_and_torchvision_keys(output_stride):
    trunk = TRUNKS["resnet50"](output_stride)
    keys = trunk.state_dict()
    # torchvision's names and shapes, so its ImageNet checkpoints load directly.
    assert keys["conv1.weight"].shape == (64, 3, 7, 7)
    assert keys["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert keys["layer4.0.conv2.weight"].shape == (512, 512, 3, 3)
    assert keys["layer4.2.bn3.running_var"].shape == (2048,)
    assert "layer3.5.conv3.weight" in keys
    feats = trunk.eval()(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [64 // s for s in trunk.strides]
    assert trunk.strides[-1] == output_stride and trunk.channels == [256, 512, 1024, 2048]


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    source = TRUNKS["resnet18"](8)
    state = dict(source.state_dict())
    state["fc.weight"] = torch.zeros(1000, 512)  # a classifier, as in an ImageNet checkpoint
    torch.save(state, tmp_path / "resnet18.pth")
    target = TRUNKS["resnet18"](8)
    load_pretrained_trunk(target, tmp_path / "resnet18.pth")
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not match"):
        load_pretrained_trunk(target, tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        load_pretrained_trunk(target, tmp_path / "missing.pth")


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"model.decoder: unknown name 'segformer'.*deeplabv3plus"):
        build_model(tiny_model_config(decoder="segformer"))


def test_saved_model_round_trip(tmp_path):
    cfg = tiny_model_config(method="explicit", decoder="unet")
    model = build_model(cfg).eval()
    save_model(model, cfg, tmp_path / "model", metadata={"epoch": 3})
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "weights.safetensors"]
    loaded, loaded_cfg = load_saved_model(tmp_path / "model")
    assert loaded_cfg == cfg
    image = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(image).fused, loaded(image).fused)


def test_saved_model_rejects_unknown_format_version(tmp_path):
    cfg = tiny_model_config()
    save_model(build_model(cfg), cfg, tmp_path / "model")
    config_file = tmp_path / "model" / "config.json"
    config_file.write_text(config_file.read_text().replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(ValueError, match="format_version 99 is not supported"):
        load_saved_model(tmp_path / "model")


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", "config.json: expected a JSON object, got list"),
        ('"text"', "config.json: expected a JSON object, got str"),
        ('{"format_version": 1, "model": [1]}', 'config.json: expected objects under "model" and "metadata"'),
        ('{"format_version": 1, "model": {}, "metadata": 3}', 'expected objects under "model" and "metadata"'),
        ('{"format_version": 1, "model": {"num_classes": "many"}}', "config.json: model.num_classes: Input should be"),
        ('{"format_version": 1, "model": {"trunk_x": 1}}', "config.json: model.trunk_x: Extra inputs"),
        (b"\xff\xfe{}", "config.json is not valid JSON"),
    ],
)
def test_a_saved_model_config_that_is_not_ours_is_one_error_naming_the_file(tmp_path, content, message):
    """A config.json that is not an object, or whose model does not validate, used to end in an
    AttributeError, KeyError or pydantic traceback."""
    cfg = tiny_model_config()
    save_model(build_model(cfg), cfg, tmp_path / "model")
    config_file = tmp_path / "model" / "config.json"
    config_file.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=re.escape(message)):
        load_saved_model(tmp_path / "model")


def test_a_saved_model_config_that_is_a_fifo_or_huge_is_refused_before_reading(tmp_path):
    cfg = tiny_model_config()
    save_model(build_model(cfg), cfg, tmp_path / "model")
    config_file = tmp_path / "model" / "config.json"
    config_file.unlink()
    os.mkfifo(config_file)  # reading it would wait for a writer for ever
    with pytest.raises(ValueError, match="config.json is a FIFO \\(named pipe\\), not a regular file"):
        load_saved_model(tmp_path / "model")
    config_file.unlink()
    with open(config_file, "wb") as handle:
        handle.truncate(3 << 30)  # sparse: 3 GB declared
    with pytest.raises(ValueError, match="config.json is 3221225472 bytes, more than the 1048576 allowed"):
        load_saved_model(tmp_path / "model")


def test_hierarchical_runs_no_attention_head_at_its_top_scale():
    """The fusion never reads the top scale's attention, so computing it would be waste."""
    model = build_model(tiny_model_config(method="hierarchical", train_scales=[0.5, 1.0])).eval()
    calls = []
    model.segmenter.attn_head.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 96), [0.5, 1.0, 2.0])
    assert len(calls) == 2  # at 0.5 and 1.0, not at 2.0
