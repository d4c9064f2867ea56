"""Every file a stage writes, and how an earlier version of it is recognised by its content.

A stage replaces such a file only when it holds what the stage writes there (components/atomic.py,
check_replaceable): a user's notes, README.md, params.yaml or .git/config at an output path are
refused, not lost. Stages check their files before any work (check_files), so a refusal never
comes after hours of training; atomic_file checks again when it writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from components.config import PipelineConfig
from components.owned_files import Recogniser, check_replaceable, csv_with_header, json_with, starting_with, yaml_with

TRAINING_CURVES = csv_with_header("epoch", "loss", "val_miou")
TRAINING_METRICS = json_with("best_val_miou", "epochs")
RUN_RECORD = json_with("run_id", "model_uri")
REGISTRATION = json_with("model_name", "version", "promoted")
TRIALS = csv_with_header("trial")
BEST_TRIAL = yaml_with("trial", "settings")
EVAL_SCALES_TABLE = csv_with_header("name", "scales", "gflops")
EVAL_SCALES_CHOICE = yaml_with("recommended", "pareto_front")
SEED_RESULT = json_with("method", "seed", "miou")
METHOD_RESULT = json_with("method", "seeds")
ABLATION_TABLE = starting_with(b"| method |")
ABLATION_ROWS = json_with("method", "fusion")
NUMPY_ARRAY = starting_with(b"\x93NUMPY")
NUMPY_ARCHIVE = starting_with(b"PK\x03\x04")  # numpy's .npz: a zip of arrays
PNG_IMAGE = starting_with(b"\x89PNG\r\n\x1a\n")
BENCHMARK_RESULT = json_with()  # any JSON object: benchmarks/ writes into a folder of its own
MARKDOWN_SUMMARY = starting_with(b"#")


# Per val image confusion matrices, one array per scale set (.npz): the registry gate's evidence
# (pipeline/register.py), written by evaluate in its output folder (eval-scales: eval_scales.image_matrices).
EVALUATE_IMAGES = "image_matrices.npz"


class OutputFile(NamedTuple):
    key: str  # the setting that places it, named in errors
    path: Path
    recognise: Recogniser


def train_files(cfg: PipelineConfig) -> list[OutputFile]:
    t = cfg.train
    return [OutputFile("train.curves", Path(t.curves), TRAINING_CURVES),
            OutputFile("train.metrics", Path(t.metrics), TRAINING_METRICS),
            OutputFile("train.run_record", Path(t.run_record), RUN_RECORD)]


def tune_files(cfg: PipelineConfig) -> list[OutputFile]:
    return [OutputFile("tune.trials", Path(cfg.tune.trials), TRIALS),
            OutputFile("tune.best", Path(cfg.tune.best), BEST_TRIAL)]


def eval_scales_files(cfg: PipelineConfig) -> list[OutputFile]:
    es = cfg.eval_scales
    return [OutputFile("eval_scales.table", Path(es.table), EVAL_SCALES_TABLE),
            OutputFile("eval_scales.image_matrices", Path(es.image_matrices), NUMPY_ARCHIVE),
            OutputFile("eval_scales.recommendation", Path(es.recommendation), EVAL_SCALES_CHOICE)]


def check_files(files: list[OutputFile]) -> None:
    """Before any work: every file a stage will replace is absent or one it wrote."""
    for file in files:
        check_replaceable(file.path, file.recognise, file.key)
