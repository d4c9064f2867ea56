"""The saved-model format: a directory with `weights.safetensors` and `config.json`.

config.json holds the model config and a format version, so evaluation, registration and
prediction rebuild the network without any training code and without unpickling anything.
"""

from __future__ import annotations

import json
from pathlib import Path

from components.atomic import atomic_dir
from components.config import ModelConfig
from components.models.build import build_model
from components.models.multiscale import MultiScaleSegmenter
from components.safe_files import read_regular

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"


def write_model_files(model: MultiScaleSegmenter, cfg: ModelConfig, directory: str | Path,
                      metadata: dict | None = None) -> None:
    """Write the two files into an existing directory (a checkpoint's, or save_model's temporary)."""
    from safetensors.torch import save_file  # imported here: `components` needs only torch and pydantic

    directory = Path(directory)
    # Saved models never point at a local pretrained file: the weights are all in the directory.
    config = cfg.model_copy(update={"pretrained": None}).model_dump(mode="json")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE)
    document = {"format_version": FORMAT_VERSION, "model": config, "metadata": metadata or {}}
    (directory / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")


def save_model(
    model: MultiScaleSegmenter, cfg: ModelConfig, directory: str | Path, metadata: dict | None = None
) -> Path:
    """Write the model atomically: the directory appears complete or not at all."""
    with atomic_dir(directory, recognise=is_saved_model) as tmp:
        write_model_files(model, cfg, tmp, metadata)
    return Path(directory)


def is_saved_model(directory: str | Path) -> bool:
    """A directory this format wrote (replacing it loses nothing of the user's)."""
    return (Path(directory) / CONFIG_FILE).is_file() and (Path(directory) / WEIGHTS_FILE).is_file()


MAX_CONFIG_BYTES = 1 << 20  # a model's description and class list; far larger is not one of ours


def read_saved_config(directory: str | Path) -> tuple[ModelConfig, dict]:
    """The model config and metadata of a saved model's config.json; anything else in its place
    (not a small regular file, not a JSON object, a config that does not validate) is one
    ValueError naming the file."""
    from pydantic import ValidationError

    directory = Path(directory)
    path = directory / CONFIG_FILE
    try:
        data = read_regular(path, f"saved model's {CONFIG_FILE}", MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory} is not a saved model: {CONFIG_FILE} is missing") from None
    try:
        document = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(document).__name__}")
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {version!r} is not supported (this code reads version {FORMAT_VERSION})"
        )
    metadata = document.get("metadata", {})
    if not isinstance(document.get("model"), dict) or not isinstance(metadata, dict):
        raise ValueError(f"{path}: expected objects under \"model\" and \"metadata\"")
    try:
        cfg = ModelConfig.model_validate(document["model"])
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise ValueError(f"{path}: model.{key}: {first['msg']} (got {first.get('input')!r})") from None
    return cfg, metadata


def load_saved_model(directory: str | Path) -> tuple[MultiScaleSegmenter, ModelConfig]:
    """Rebuild the model from config.json and load its weights; returns it in eval mode.

    The model's `metadata` attribute holds config.json's metadata (epoch, class names, colours)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg, metadata = read_saved_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} is not a saved model: {WEIGHTS_FILE} is missing")
    model = build_model(cfg)
    try:
        model.load_state_dict(load_file(weights), strict=True)
    except (RuntimeError, SafetensorError) as err:  # truncated or foreign file, or another architecture
        first = str(err).strip().splitlines()[0][:300]
        raise ValueError(
            f"{weights}: the weights cannot be loaded into the model its {CONFIG_FILE} describes ({first})"
        ) from None
    model.metadata = metadata  # type: ignore[assignment]  # an attribute of ours on the module
    return model.eval(), cfg
