"""What the `register` stage (pipeline/register.py) gates on: the evaluation of the scale set the
registered model will serve, read from the evaluate or eval-scales stage's outputs, with its per-image
confusion matrices for the paired bootstrap.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import yaml

from components.config import PipelineConfig
from components.scales import scale_set_key
from pipeline.runtime import output_files


def served_evaluation(cfg: PipelineConfig) -> dict:
    """{scales, miou, gflops, source, image_matrices} of the scale set the registered model will
    serve; image_matrices are its per-image confusion matrices (images, C, C)."""
    rc = cfg.register
    if rc.scale_set == "recommended":
        path = Path(cfg.eval_scales.recommendation)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no inference-scale search to take register.scale_set = recommended "
                                    "from (run the eval-scales stage, or set register.scale_set to a list)")
        document = yaml.safe_load(path.read_text()) or {}
        recommended = document.get("recommended")
        if not recommended:
            raise ValueError(f"{path}: no recommended scale set (none is within eval_scales.max_gflops); raise "
                             "that limit or set register.scale_set to a list")
        return {"scales": [float(s) for s in recommended["scales"]], "miou": float(recommended["miou"]),
                "gflops": float(recommended["gflops"]), "source": str(path),
                "image_matrices": _recommended_matrices(path, document, recommended["name"],
                                                       Path(cfg.eval_scales.image_matrices))}
    path = Path(cfg.evaluate.output_dir) / "metrics.json"
    key = scale_set_key(rc.scale_set)
    evaluation = json.loads(path.read_text()).get(key)
    if evaluation is None:
        raise KeyError(f"{path} has no evaluation at register.scale_set = {rc.scale_set} (rerun evaluate)")
    return {"scales": list(rc.scale_set), "miou": float(evaluation["miou"]), "gflops": float(evaluation["gflops"]),
            "source": str(path), "image_matrices": _archived(path.parent / output_files.EVALUATE_IMAGES, key,
                                                             "rerun evaluate")}


def _recommended_matrices(path: Path, document: dict, name: str, archive: Path) -> np.ndarray:
    """The recommended set's per-image matrices, from eval_scales.image_matrices, checked to be the
    file the recommendation was written with (a kill between the two writes leaves another run's)."""
    named = document.get("per_image") or {}
    if not named.get("file"):
        raise ValueError(f"{path} names no per-image evaluation (written by an older eval-scales): rerun "
                         "eval-scales")
    if Path(named["file"]) != archive:
        raise ValueError(f"{path} was written with the per-image evaluation {named['file']}, but "
                         f"eval_scales.image_matrices is {archive}: rerun eval-scales")
    if not archive.is_file() or hashlib.sha256(archive.read_bytes()).hexdigest() != named.get("sha256"):
        raise ValueError(f"{archive} is not the file {path} was written with (an interrupted eval-scales?): "
                         "rerun eval-scales")
    return _archived(archive, name, "rerun eval-scales")


def _archived(archive: Path, key: str, remedy: str) -> np.ndarray:
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: no per-image evaluation for the registry gate ({remedy})")
    with np.load(archive) as arrays:
        if key not in arrays.files:
            raise KeyError(f"{archive} has no per-image evaluation of {key} ({remedy})")
        return arrays[key]
