"""Typed configuration, loaded once from params.yaml and passed down as arguments.

Every section forbids unknown keys, so a typo fails at load time instead of being ignored.
`load_config` validates the whole file (types, then rules that span several keys) before
anything runs, and its errors name the key path and the offending value.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from components.methods import eval_scales_problem, train_scales_problem
from components.scales import crop_grid_step

MethodName = Literal["single", "avgpool", "maxpool", "explicit", "hierarchical"]
METHODS: tuple[str, ...] = get_args(MethodName)


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message names the key and the value."""


def _check_scale_set(scales: list[float]) -> list[float]:
    if not scales:
        raise ValueError("a scale set needs at least one scale")
    bad = [s for s in scales if s <= 0]
    if bad:
        raise ValueError(f"scales must be positive, got {bad}")
    if len(set(scales)) != len(scales):
        raise ValueError(f"scales must not repeat, got {scales}")
    # A scale set is a set: keep one canonical (ascending) order everywhere.
    return sorted(float(s) for s in scales)


ScaleSet = Annotated[list[float], AfterValidator(_check_scale_set)]


def _switch(value: Any) -> Any:
    """auto, on or off. YAML 1.1 (PyYAML, which reads params.yaml) already makes on/off booleans;
    written as strings (quoted, in JSON, or by a YAML 1.2 tool) they mean the same."""
    if isinstance(value, bool):
        return value
    named = {"auto": "auto", "on": True, "true": True, "off": False, "false": False}.get(
        value.strip().lower() if isinstance(value, str) else "")
    if named is None:
        raise ValueError("should be auto, on or off")
    return named


Switch = Annotated[Literal["auto", True, False], BeforeValidator(_switch)]


class Section(BaseModel):
    # allow_inf_nan=False: every float of every section is finite (`lr: .inf` used to train on NaN
    # losses until Ray gave up; `cpus_per_worker: .inf` asked the cluster for infinite CPUs).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# The names of components.models.trunks.TRUNKS and decoders.DECODERS (a test keeps them equal):
# named here so a wrong name fails at config load, listing the allowed ones, not inside a worker.
TRUNK_NAMES = ("resnet18", "resnet50", "tiny")
DECODER_NAMES = ("deeplabv3plus", "pspnet", "fcn", "unet")
PositiveInt = Annotated[int, Field(gt=0)]
CropSize = tuple[PositiveInt, PositiveInt]  # height, width in pixels
# numpy's generators take seeds in [0, 2**32); torch's too, and a negative one raises in a worker.
Seed = Annotated[int, Field(ge=0, lt=2**32)]
# Generated images: Mapillary's largest are 4000x3000; one side up to 8192 covers real sizes.
ImageSide = Annotated[int, Field(ge=32, le=8192)]


class ModelConfig(Section):
    method: MethodName = "hierarchical"
    trunk: str = "resnet18"  # one of TRUNK_NAMES (checked with the whole config)
    output_stride: Literal[8, 16] = 16
    decoder: str = "deeplabv3plus"  # one of DECODER_NAMES
    decoder_channels: int = Field(64, gt=0)
    attention_channels: int = Field(64, gt=0)
    num_classes: int = Field(19, gt=1)
    train_scales: ScaleSet = [0.5, 1.0]
    aux_scale_weight: float = Field(0.05, ge=0)
    explicit_scale_weight: float = Field(1.0, ge=0)
    pretrained: str | None = None


class TrainConfig(Section):
    epochs: int = Field(30, gt=0)
    batch_size: int = Field(4, gt=0)
    crop_size: CropSize = (192, 192)
    lr: float = Field(0.02, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    poly_power: float = Field(0.9, ge=0)
    # on the fused logits: cross-entropy, or region mutual information (half sigmoid BCE, half the
    # RMI bound), the reference implementation's default; per-scale terms stay cross-entropy
    loss: Literal["ce", "rmi"] = "ce"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    # torch.compile of the model (in YAML: auto, on or off). auto: on GPU workers, where it was worth
    # 1.15-1.19x per step (benchmarks.gpu on an H200); off on CPU, where the compiled step was slower
    # than eager (benchmarks' compile row). The first steps of training and of validation compile.
    compile: Switch = "auto"
    sync_batchnorm: bool = True  # multi-GPU only: BN statistics over the global batch
    seed: Seed = 0
    # Cap on an epoch (quick runs): this many steps at the full worker count; None: the whole split.
    # An epoch is counted in samples, so fewer workers each take more steps to cover it.
    steps_per_epoch: int | None = Field(None, gt=0)
    output: str = "models/hmsa"  # the saved-model directory of the best epoch
    metrics: str = "results/train/metrics.json"
    curves: str = "results/train/curves.csv"
    run_record: str = "results/train/run.json"  # the MLflow run and logged model of this training


class RayConfig(Section):
    """How training is spread over Ray workers. Where the cluster is (RAY_ADDRESS) and where
    checkpoints go (HMSA_STORAGE) are environment, not params: see pipeline/runtime/environment.py."""

    # A fixed count, or [min, max] for elastic training: the run goes on with fewer workers when a
    # node goes and grows again when one comes back.
    num_workers: int | tuple[int, int] = 1
    use_gpu: Switch = "auto"  # auto: GPU workers when the cluster has GPUs
    cpus_per_worker: float = Field(2, gt=0)
    gpus_per_worker: float = Field(1, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = Field(2, ge=-1)
    # worker-group starts that may fail or time out (the cluster's resources held by other work)
    # before the run fails; Ray Train's own default retries them for ever
    max_start_failures: int = Field(5, ge=0)
    checkpoints_to_keep: int = Field(2, gt=0)
    elastic_resize_interval_s: float = Field(60.0, gt=0)  # elastic runs: how often to look for more workers
    # how long a launch waits for an autoscaling cluster to add the nodes its workers need (0: not at all)
    scale_up_timeout_s: float = Field(600.0, ge=0)

    @field_validator("num_workers")
    @classmethod
    def _worker_range(cls, value):
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError("a positive count, or [min, max] with 1 <= min <= max")
        return value

    @property
    def worker_range(self) -> tuple[int, int]:
        n = self.num_workers
        return (n, n) if isinstance(n, int) else (int(n[0]), int(n[1]))


class MlflowConfig(Section):
    """Where the tracking server is (MLFLOW_TRACKING_URI) is environment, not a param."""

    experiment: str = Field("hmsa", min_length=1, max_length=200)


class SyntheticConfig(Section):
    """The bundled procedural street scenes (components.data.synthetic)."""

    train_images: int = Field(80, gt=0, le=100_000)
    val_images: int = Field(24, gt=0, le=100_000)
    height: ImageSide = 192
    width: ImageSide = 384
    seed: Seed = 0


def _local_output(path: str) -> str:
    if "://" in path:
        raise ValueError("an output of a stage is a local path that DVC tracks and caches (`dvc push` moves it "
                         "to the S3 remote; training publishes the pyramid to HMSA_STORAGE itself)")
    return path


LocalPath = Annotated[str, AfterValidator(_local_output)]


class PrepareConfig(Section):
    dataset: Literal["synthetic", "cityscapes", "mapillary", "voc", "folder"] = "synthetic"
    source: str | None = None  # the raw dataset's directory (unused for synthetic)
    output: LocalPath = "data/raw/synthetic"
    on_bad_sample: Literal["error", "skip"] = "error"
    # images or labels whose header declares more pixels are refused before decoding
    max_pixels: int = Field(40_000_000, gt=0)
    # processes converting (and generating) images at once (auto: the CPUs this process may use)
    workers: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"
    synthetic: SyntheticConfig = SyntheticConfig()


class PyramidConfig(Section):
    scales: ScaleSet = [0.25, 0.375, 0.5, 0.75, 1.0, 1.5, 2.0]
    output: LocalPath = "data/pyramid/synthetic"  # DVC-tracked; published to HMSA_STORAGE for clusters
    shard_size: int = Field(64, gt=0)
    tile: int = Field(256, ge=16, le=4096)  # pixels per side of a stored tile: a crop reads the tiles under it
    # processes building shards at once (auto: the CPUs this process may use); each holds one image
    workers: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"


class LoaderConfig(Section):
    # Random scale augmentation: the pyramid level that plays the role of 1.0 for a sample.
    random_scales: ScaleSet = [0.5, 1.0, 2.0]
    # Or a continuous range [low, high] (the paper's 0.5 to 2.0): r drawn uniformly, the image at r
    # made from the nearest stored level at or above it; random_scales is then unused.
    random_scale_range: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] | None = None
    flip: bool = True
    brightness: float = Field(0.25, ge=0)
    contrast: float = Field(0.25, ge=0)
    saturation: float = Field(0.25, ge=0)
    hue: float = Field(0.02, ge=0, le=0.5)
    photometric_probability: float = Field(0.8, ge=0, le=1)
    class_uniform: float = Field(0.0, ge=0, le=1)  # share of samples drawn by rare-class sampling
    # loader processes per training worker; auto: one fewer than the worker's CPUs (on CPU at most
    # 4: the training threads keep the rest), and 0 on a single CPU
    # (a process each, per training worker: more than 64 is a typo, not a machine)
    workers: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = "auto"


class EvaluateConfig(Section):
    model: str | None = None  # None: train.output; or a saved-model directory, or models:/name@alias
    scale_sets: Annotated[list[ScaleSet], Field(min_length=1)] = [[1.0], [0.5, 1.0], [0.5, 1.0, 2.0],
                                                                  [0.25, 0.5, 1.0, 2.0]]
    flip: bool = False
    pictures: int = Field(4, ge=0)  # val images drawn in the attention figure
    batch_size: int = Field(4, ge=1)  # val images per forward pass on each evaluation worker
    output_dir: str = "results/eval"


class SearchSpec(Section):
    """How one hyperparameter is searched: exactly one of the four kinds."""

    choice: Annotated[list[Any], Field(min_length=1)] | None = None
    grid: Annotated[list[Any], Field(min_length=1)] | None = None  # every value, in order (Tune's grid_search)
    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        given = [k for k in ("choice", "grid", "loguniform", "uniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, grid, loguniform, uniform (got {given or 'none'})")
        listed = [v for kind in ("choice", "grid") for v in getattr(self, kind) or []]
        if any(isinstance(v, float) and not math.isfinite(v) for v in listed):
            raise ValueError(f"values must be finite numbers, got {listed}")
        for kind in ("loguniform", "uniform"):
            bounds = getattr(self, kind)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{kind} = {list(bounds)}: expected [low, high] with low < high")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform = {list(self.loguniform)}: a log scale needs low > 0")
        return self


# What a search can vary (pipeline/runtime/search_space.py turns a trial's values into its config).
SearchableKey = Literal["train_scales", "lr", "crop_size", "aux_scale_weight", "method"]
SEARCHABLE: tuple[str, ...] = get_args(SearchableKey)


class TuneConfig(Section):
    num_samples: int = Field(3, gt=0)
    epochs: int = Field(2, gt=0)  # per trial: ASHA's max_t
    steps_per_epoch: int | None = Field(8, gt=0)
    grace_period: int = Field(1, gt=0)
    reduction_factor: int = Field(2, gt=1)
    seed: Seed = 0
    # Named training scale sets: searchers see the names, trials train on the lists.
    train_scale_sets: dict[str, ScaleSet] = {"s05_10": [0.5, 1.0], "s075_10": [0.75, 1.0]}
    search: dict[SearchableKey, SearchSpec] = {
        "train_scales": SearchSpec(choice=["s05_10", "s075_10"]),
        "lr": SearchSpec(loguniform=(0.005, 0.05)),
    }
    apply_to_train: bool = True  # the train stage trains the best trial's settings
    trials: str = "results/tune/trials.csv"  # one row per trial
    best: str = "results/tune/best.yaml"  # the best trial's settings, which train reads


class EvalScalesConfig(Section):
    """The `eval-scales` stage: the inference-scale search of the trained model (no retraining)."""

    scale_sets: Annotated[dict[str, ScaleSet], Field(min_length=1)] = {
        "s10": [1.0], "s05_10": [0.5, 1.0], "s075_10_15": [0.75, 1.0, 1.5], "s05_10_20": [0.5, 1.0, 2.0],
        "s025_05_10_20": [0.25, 0.5, 1.0, 2.0]}
    max_gflops: float | None = Field(None, gt=0)  # recommend the best set within this cost (None: no limit)
    table: str = "results/eval_scales/table.csv"  # mIoU and GFLOPs per set, Pareto front marked
    image_matrices: str = "results/eval_scales/image_matrices.npz"  # per set, a confusion matrix per val image
    recommendation: str = "results/eval_scales/recommended.yaml"  # what register serves, written last


class RegisterConfig(Section):
    # a name in the MLflow registry and in models:/<name>@<alias> URIs, where "/" would split it
    model_name: str = Field("hmsa", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
    # the served scale set, whose mIoU and GFLOPs gate promotion and which callers get by default:
    # "recommended" (the eval-scales stage's recommendation) or a set among evaluate.scale_sets
    scale_set: Literal["recommended"] | ScaleSet = "recommended"
    # the candidate's mIoU minus the champion's must lie above this over the 95% interval of a
    # paired bootstrap over the val images, of bootstrap_rounds rounds
    min_delta: float = Field(0.0, ge=0)
    bootstrap_rounds: int = Field(2000, ge=100, le=1_000_000)
    max_gflops: float | None = Field(None, gt=0)  # a candidate above this cost is never champion
    # the served model's bound on one request's work: its images' pixels x the sum of its squared
    # scales (a 2048x1024 image at [0.5, 1.0, 2.0] is 11 million); larger requests are answered 400
    max_request_pixels: int = Field(64_000_000, ge=1, le=10**10)
    output: str = "results/register/registration.json"


class AblationMethod(Section):
    """One row of the method table. A row named after its method needs no `method`; another row
    (e.g. hierarchical evaluated at its training scales) names the method it trains. Rows that
    train alike share their trainings (pipeline.runtime.cluster.run_key), so such a row costs evaluations."""

    train_scales: ScaleSet
    eval_scales: ScaleSet
    method: MethodName | None = None


# A table row's name is also a DVC stage key and a folder name.
RowName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]


class AblationConfig(Section):
    """The paper's method table on this data: every method trained with the same budget."""

    epochs: int = Field(40, gt=0)
    crop_size: CropSize = (128, 128)
    # The table's own model size (null: the model section's): small enough that all methods and
    # seeds fit the budget, with enough resolution (output stride) to learn thin structures.
    trunk: str | None = "tiny"  # one of TRUNK_NAMES
    output_stride: Literal[8, 16] | None = 8
    # every method is trained once per seed (same seeds for all: paired); the table gives mean +- std
    seeds: Annotated[list[Seed], Field(min_length=1)] = [0, 1, 2]
    bootstrap_rounds: int = Field(2000, ge=100)  # of the paired bootstrap behind the significance column
    # One augmentation for all methods, valid for the widest training set (explicit's).
    random_scales: ScaleSet = [1.0]
    # Share of class-uniform samples in the table's trainings (null: loader.class_uniform's).
    class_uniform: float | None = Field(0.5, ge=0, le=1)
    output_dir: str = "results/ablation"
    methods: dict[RowName, AblationMethod] = {
        "single": AblationMethod(train_scales=[1.0], eval_scales=[1.0]),
        "avgpool": AblationMethod(train_scales=[1.0], eval_scales=[0.5, 1.0, 2.0]),
        "maxpool": AblationMethod(train_scales=[1.0], eval_scales=[0.5, 1.0, 2.0]),
        "explicit": AblationMethod(train_scales=[0.5, 1.0, 2.0], eval_scales=[0.5, 1.0, 2.0]),
        "hierarchical": AblationMethod(train_scales=[0.5, 1.0], eval_scales=[0.5, 1.0, 2.0]),
        "hierarchical_05_10": AblationMethod(method="hierarchical", train_scales=[0.5, 1.0],
                                             eval_scales=[0.5, 1.0]),
    }

    @model_validator(mode="after")
    def _rows_name_their_method(self) -> AblationConfig:
        for name, row in self.methods.items():
            if row.method is None and name not in METHODS:
                raise ValueError(f"methods.{name}: a row not named after a method needs `method:` "
                                 f"(one of {', '.join(METHODS)})")
        return self

    def method_of(self, row: str) -> str:
        """The method a table row trains and evaluates."""
        return self.methods[row].method or row


# The stage is called `register`, which pydantic warns shadows ABCMeta.register on the class; the
# field is only ever read on instances, where it is the section. Silence that one warning.
warnings.filterwarnings("ignore", message='Field name "register" in "PipelineConfig" shadows')


class PipelineConfig(Section):
    prepare: PrepareConfig = PrepareConfig()
    pyramid: PyramidConfig = PyramidConfig()
    loader: LoaderConfig = LoaderConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig()
    tune: TuneConfig = TuneConfig()
    eval_scales: EvalScalesConfig = EvalScalesConfig()
    register: RegisterConfig = RegisterConfig()
    ablation: AblationConfig = AblationConfig()
    evaluate: EvaluateConfig = EvaluateConfig()


# Settings that say where a run writes, how it survives faults or how fast it loads, never what it
# computes (the loader seeds every sample, not every loader process). A training's identity
# (pipeline.runtime.cluster.run_key) leaves them out, and so do the params of the training stages in
# dvc.yaml: editing one reruns no training and no search (tests/test_stage_params.py holds the table).
OPERATIONAL_KEYS = {
    "train": ("output", "metrics", "curves", "run_record"),
    "loader": ("workers",),
    "ray": ("placement_strategy", "max_failures", "max_start_failures", "checkpoints_to_keep",
            "elastic_resize_interval_s", "scale_up_timeout_s"),
    "mlflow": ("experiment",),
}
# What of `tune` the search of training settings computes with; the other keys are its output files
# and whether the train stage takes its result.
SEARCH_KEYS = ("num_samples", "epochs", "steps_per_epoch", "grace_period", "reduction_factor", "seed",
               "train_scale_sets", "search")


def result_settings(cfg: PipelineConfig, section: str) -> dict:
    """A section's settings without its operational keys (OPERATIONAL_KEYS)."""
    return getattr(cfg, section).model_dump(mode="json", exclude=set(OPERATIONAL_KEYS.get(section, ())))


# Stage outputs: the directories a stage replaces as a whole, and the files and folders it writes.
DIRECTORY_OUTPUTS = ("prepare.output", "pyramid.output", "train.output", "evaluate.output_dir")
FILE_OUTPUTS = ("train.metrics", "train.curves", "train.run_record", "register.output", "tune.trials", "tune.best",
                "eval_scales.table", "eval_scales.image_matrices", "eval_scales.recommendation", "ablation.output_dir")


def _value(cfg: PipelineConfig, key: str) -> str:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


# What an output must never replace: the files that define the pipeline and its history.
REPOSITORY_FILES = ("params.yaml", "dvc.yaml", "dvc.lock", ".gitignore", ".dvcignore")
REPOSITORY_FOLDERS = (".git", ".dvc")


def _resolved(value: str) -> PurePosixPath:
    """The path an output lands on: absolute, links followed (`data/raw` and `/repo/data/raw`, or a
    link to it, are one output). URIs (s3://) are compared as written, normalised."""
    if "://" in value:
        return PurePosixPath(os.path.normpath(value))
    return PurePosixPath(os.path.realpath(value))


def _repository_file_problem(key: str, value: str, path: PurePosixPath, params_file: str | None) -> str | None:
    if "://" in value:
        return None
    inside = next((part for part in path.parts if part in REPOSITORY_FOLDERS), None)
    if inside:
        return f"{key} = {value}: inside {inside}/, which belongs to {inside[1:]}; choose another path"
    if params_file and path == _resolved(params_file):
        return f"{key} = {value}: is the params file being read ({params_file}); choose another path"
    if path.name in REPOSITORY_FILES:
        return f"{key} = {value}: is the repository's own {path.name}; choose another path"
    return None


# An output is written under a temporary name beside it (`.<name>.tmp-XXXXXXXX`, `.<name>.lock`,
# `.<name>.generate-XXXXXXXX`): its name must leave room for the longest of these within NAME_MAX.
NAME_MAX = 255
TEMPORARY_NAME_EXTRA = 24


def _output_path_problem(key: str, value: str) -> str | None:
    """A local output whose name is too long for its temporaries, or that lies below a file."""
    if "://" in value:
        return None
    path = PurePosixPath(os.path.normpath(value))
    size = len(path.name.encode())
    if size + TEMPORARY_NAME_EXTRA > NAME_MAX:
        return (f"{key} = {value}: its name is {size} bytes; it is written under a temporary name up to "
                f"{TEMPORARY_NAME_EXTRA} bytes longer and a file name holds {NAME_MAX}: shorten it to at most "
                f"{NAME_MAX - TEMPORARY_NAME_EXTRA}")
    for parent in reversed(path.parents):
        if os.path.lexists(parent) and not os.path.isdir(parent):
            return f"{key} = {value}: {parent} is a file, not a folder; choose another path"
    return None


def output_overlaps(cfg: PipelineConfig, params_file: str | None = None) -> list[str]:
    """Pairs of outputs where one stage would replace or delete what another wrote: the same path
    however spelt, or any output inside a directory that a stage replaces as a whole; and outputs on
    the repository's own files (params.yaml, dvc.yaml, .git/...)."""
    paths = {key: _resolved(_value(cfg, key)) for key in DIRECTORY_OUTPUTS + FILE_OUTPUTS}
    problems = [problem for key, path in paths.items()
                if (problem := _output_path_problem(key, _value(cfg, key))
                    or _repository_file_problem(key, _value(cfg, key), path, params_file))]
    keys = list(paths)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            pa, pb = paths[a], paths[b]
            inside = (a in DIRECTORY_OUTPUTS and pa in pb.parents) or (b in DIRECTORY_OUTPUTS and pb in pa.parents)
            if pa == pb or inside:
                problems.append(f"{a} = {_value(cfg, a)} and {b} = {_value(cfg, b)} overlap: one stage would "
                                "replace what the other wrote; give each its own path")
    return problems


def _crop_problem(key: str, crop: tuple[int, int], scales_key: str, scales: list[float]) -> str | None:
    """A training crop is cut at every training scale; its size must map to whole pixels at each."""
    try:
        step = crop_grid_step(scales)
    except ValueError as err:
        return f"{scales_key} = {scales}: {err}"
    if any(int(c) % step for c in crop):
        return (f"{key} = {list(crop)}: with {scales_key} {scales} a crop must be a multiple of {step} pixels, "
                f"so that its region is whole pixels at every scale (e.g. {[c // step * step or step for c in crop]})")
    return None


def _crop_problems(cfg: PipelineConfig) -> list[str]:
    checks = [("train.crop_size", cfg.train.crop_size, "model.train_scales", cfg.model.train_scales)]
    searched = cfg.tune.search.get("crop_size")
    crops = [("train.crop_size", cfg.train.crop_size)] + [
        ("tune.search.crop_size", tuple(c) if isinstance(c, (list, tuple)) else (c, c))
        for c in ((searched.choice or searched.grid or []) if searched else [])]
    for name, scales in cfg.tune.train_scale_sets.items():
        checks += [(key, crop, f"tune.train_scale_sets.{name}", scales) for key, crop in crops]
    for method, spec in cfg.ablation.methods.items():
        checks.append(("ablation.crop_size", cfg.ablation.crop_size, f"ablation.methods.{method}.train_scales",
                       spec.train_scales))
    problems = []
    for check in checks:
        problem = _crop_problem(*check)
        if problem and problem not in problems:
            problems.append(problem)
    return problems


def _consistency_problems(cfg: PipelineConfig, params_file: str | None = None) -> list[str]:
    model = cfg.model
    problems = output_overlaps(cfg, params_file) + _crop_problems(cfg)
    names = [("model.trunk", model.trunk, TRUNK_NAMES), ("model.decoder", model.decoder, DECODER_NAMES)]
    if cfg.ablation.trunk is not None:
        names.append(("ablation.trunk", cfg.ablation.trunk, TRUNK_NAMES))
    for key, value, allowed in names:
        if value not in allowed:
            problems.append(f"{key}: unknown name {value!r}; expected one of {', '.join(allowed)}")
    why = train_scales_problem(model.method, model.train_scales)
    if why:
        problems.append(f"model.train_scales = {model.train_scales}: {why}")
    if cfg.prepare.dataset != "synthetic" and not cfg.prepare.source:
        problems.append(f"prepare.source = None: dataset '{cfg.prepare.dataset}' needs the path of its directory")
    levels = {round(s, 6) for s in cfg.pyramid.scales}
    if 1.0 not in levels:
        problems.append(f"pyramid.scales = {cfg.pyramid.scales}: the pyramid needs its 1.0 level")
    missing = sorted({round(r * s, 6) for r in cfg.loader.random_scales for s in model.train_scales} - levels)
    scale_range = cfg.loader.random_scale_range
    if scale_range is not None and scale_range[0] > scale_range[1]:
        problems.append(f"loader.random_scale_range = {list(scale_range)}: expected [low, high] with low <= high")
    if missing and scale_range is None:
        problems.append(
            f"loader.random_scales = {cfg.loader.random_scales}: with model.train_scales {model.train_scales} "
            f"the loader reads pyramid levels {missing}, which pyramid.scales {cfg.pyramid.scales} lacks"
        )
    search = cfg.tune.search
    if "train_scales" in search:
        spec = search["train_scales"]
        unknown = [n for n in (spec.choice or spec.grid or [])
                   if not isinstance(n, str) or n not in cfg.tune.train_scale_sets]
        if unknown or spec.loguniform or spec.uniform:
            problems.append(f"tune.search.train_scales: names {unknown or 'ranges'} are not keys of "
                            f"tune.train_scale_sets {sorted(cfg.tune.train_scale_sets)}")
    if cfg.register.scale_set != "recommended" and cfg.register.scale_set not in cfg.evaluate.scale_sets:
        problems.append(f"register.scale_set = {cfg.register.scale_set}: not among evaluate.scale_sets "
                        f"{cfg.evaluate.scale_sets}, so it has no evaluation to gate on")
    for i, scales in enumerate(cfg.evaluate.scale_sets):
        why = eval_scales_problem(model.method, model.train_scales, scales)
        if why:
            problems.append(f"evaluate.scale_sets[{i}] = {scales}: {why}")
    searched = set(cfg.tune.search) if cfg.tune.apply_to_train else set()
    if "method" not in searched and not (model.method == "explicit" and "train_scales" in searched):
        # the trained model's method (and an explicit model's scales) are known: every candidate must
        # be a set it can serve, or the stage would stop at it after the training
        for name, scales in cfg.eval_scales.scale_sets.items():
            why = eval_scales_problem(model.method, model.train_scales, scales)
            if why:
                problems.append(f"eval_scales.scale_sets.{name} = {scales}: {why}")
    return problems


def with_overrides(cfg: PipelineConfig, overrides: dict[str, dict], source: str) -> PipelineConfig:
    """A copy of `cfg` with some keys of some sections replaced, validated as a whole."""
    raw = cfg.model_dump(mode="json")
    for section, values in overrides.items():
        raw[section].update(values)
    return validate_config(raw, source=source)


def ablation_seed_dir(cfg: PipelineConfig, row: str, seed: int) -> str:
    """Where one seed of one row of the method table writes: its model, run record and results."""
    return f"{cfg.ablation.output_dir}/{row}/seed-{seed}"


def ablation_config(cfg: PipelineConfig, row: str, seed: int | None = None) -> PipelineConfig:
    """The full config of one ablation run (a row of the table, ablation.methods.<row>, and a seed):
    the base config with the row's method, its scales, the seed and the shared budget swapped in,
    validated like any other (so a bad entry names its key). Outputs go to <output_dir>/<row>/."""
    if row not in cfg.ablation.methods:
        raise ConfigError(f"ablation.methods has no entry {row!r}; it has {sorted(cfg.ablation.methods)}")
    entry, ab = cfg.ablation.methods[row], cfg.ablation
    seed = ab.seeds[0] if seed is None else seed
    out = ablation_seed_dir(cfg, row, seed)
    return with_overrides(
        cfg,
        {
            "model": {
                "method": ab.method_of(row),
                "train_scales": entry.train_scales,
                **({"trunk": ab.trunk} if ab.trunk else {}),
                **({"output_stride": ab.output_stride} if ab.output_stride else {}),
            },
            "train": {
                "epochs": ab.epochs,
                "crop_size": list(ab.crop_size),
                "output": f"{out}/model",
                "seed": seed,
                "metrics": f"{out}/train_metrics.json",
                "curves": f"{out}/curves.csv",
                "run_record": f"{out}/run.json",
            },
            "loader": {
                "random_scales": ab.random_scales,
                **({"class_uniform": ab.class_uniform} if ab.class_uniform is not None else {}),
            },
            "evaluate": {"scale_sets": [entry.eval_scales], "output_dir": f"{out}/eval", "model": None},
            "eval_scales": {"scale_sets": {row: entry.eval_scales}},  # a row is evaluated at its own set
            "mlflow": {"experiment": f"{cfg.mlflow.experiment}-ablation"},
            "tune": {"apply_to_train": False},  # the table compares methods, not tuned settings
            "register": {"scale_set": entry.eval_scales},
        },
        source=f"ablation.methods.{row}",
    )


# Pydantic names the member of a union that a value failed against inside the error's location
# ("loader.workers.constrained-int", "ray.num_workers.tuple[int,int]"): not a key a user can find.
UNION_MEMBER_TAG = re.compile(r"(constrained-\w+|function-(after|before|wrap|plain)\[.*\]|literal\[.*\]"
                              r"|(tuple|list|dict|set|union|tagged-union|lax-or-strict|json-or-python|nullable"
                              r"|default|is-instance|model)\[.*\]|int|float|str|bool|none)")


def _key_path(location: tuple) -> str:
    parts = [p for p in location if isinstance(p, int) or not UNION_MEMBER_TAG.fullmatch(p)]
    return ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in parts).replace(".[", "[")


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in err.errors():
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against params.yaml)"
        line = f"  {_key_path(item['loc'])}: {msg} (got {item.get('input')!r})"
        if line not in lines:
            lines.append(line)
    return "\n".join(lines)


# Keys that used to be params and are now environment (they say where the run happens, not what it
# computes, so changing them must not rerun any stage).
MOVED_TO_ENVIRONMENT = {
    ("ray", "address"): "RAY_ADDRESS",
    ("ray", "storage_path"): "HMSA_STORAGE (s3://bucket/prefix or a shared path)",
    ("mlflow", "tracking_uri"): "MLFLOW_TRACKING_URI",
    ("mlflow", "artifact_location"): "the tracking server's --artifacts-destination",
    ("storage", None): "AWS_ENDPOINT_URL and AWS_REGION",
}


# Keys that moved to another section of params.yaml.
MOVED_IN_PARAMS = {
    ("tune", "eval_scale_sets"): "eval_scales.scale_sets",
    ("tune", "max_eval_gflops"): "eval_scales.max_gflops",
    ("tune", "output_dir"): "tune.trials and tune.best (the paths of its two files)",
}


def _moved_keys(raw: dict) -> list[str]:
    found = [f"{section}.{key}: moved to {new}"
             for (section, key), new in MOVED_IN_PARAMS.items()
             if isinstance(raw.get(section), dict) and key in raw[section]]
    for (section, key), variable in MOVED_TO_ENVIRONMENT.items():
        value = raw.get(section)
        if key is None and section in raw:
            found.append(f"{section}: is environment now, not a param: set {variable}")
        elif isinstance(value, dict) and key in value:
            found.append(f"{section}.{key}: is environment now, not a param: set {variable}")
    return found


def validate_config(raw: dict[str, Any], source: str = "<dict>", params_file: str | None = None) -> PipelineConfig:
    """Validate a parsed params dict: types and ranges first, then cross-key rules. `source` names
    where the values came from in errors; `params_file`, the file they were read from (no output may
    be it). A config derived from another (with_overrides: a trial, tune.best, an ablation row) names
    its source but reads no params file: tune.best is an output that train reads, not its params."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    moved = _moved_keys(raw)
    if moved:
        raise ConfigError(f"invalid configuration in {source}:\n  " + "\n  ".join(moved))
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    problems = _consistency_problems(cfg, params_file)
    if problems:
        raise ConfigError(f"invalid configuration in {source}:\n  " + "\n  ".join(problems))
    return cfg


def load_config(path: str | Path = "params.yaml") -> PipelineConfig:
    import yaml  # here, not at the top: GPU benchmark machines have torch and pydantic only

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.object[err.start : err.start + 1]!r})"
        ) from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    return validate_config(raw, source=str(path), params_file=str(path))
