"""Build models from the typed model config. Names map to constructors in plain dicts."""

from __future__ import annotations

from components.config import ModelConfig
from components.models.decoders import DECODERS
from components.models.multiscale import MultiScaleSegmenter
from components.models.segmenter import Segmenter
from components.models.trunks import TRUNKS, load_pretrained_trunk


def lookup(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"model.{what}: unknown name {name!r}; valid names are {sorted(table)}")
    return table[name]


def build_segmenter(cfg: ModelConfig) -> Segmenter:
    trunk = lookup(TRUNKS, cfg.trunk, "trunk")(cfg.output_stride)
    if cfg.pretrained:
        load_pretrained_trunk(trunk, cfg.pretrained)
    decoder = lookup(DECODERS, cfg.decoder, "decoder")(trunk.channels, trunk.strides, cfg.decoder_channels)
    # Only hierarchical attention reads the per-scale attention head.
    attention_channels = cfg.attention_channels if cfg.method == "hierarchical" else None
    return Segmenter(trunk, decoder, cfg.num_classes, attention_channels)


def build_model(cfg: ModelConfig) -> MultiScaleSegmenter:
    return MultiScaleSegmenter(build_segmenter(cfg), cfg.method, cfg.train_scales, cfg.attention_channels)


def training_method(cfg: ModelConfig) -> str:
    """The method whose training `cfg` runs. Average and max pooling fuse scales at inference only:
    trained at one scale they build single scale's network (no attention head) and train it the
    same way, so their trainings are single scale's (the ablation trains it once per seed for all
    three, and each evaluates the weights with its own fusion)."""
    if cfg.method in ("avgpool", "maxpool") and len(cfg.train_scales) == 1:
        return "single"
    return cfg.method
