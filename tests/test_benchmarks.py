"""The GPU benchmark runs where only torch and pydantic are installed (GPU machines here have no
Ray, MLflow, DVC, PyYAML or safetensors), and the benchmark summary reads its inputs right."""

import subprocess
import sys

import pytest

from tests.dvc_helpers import ROOT

# What GPU machines here lack; a module that imports one of them fails there.
NOT_ON_GPU_MACHINES = ["yaml", "safetensors", "albumentations", "cv2", "PIL", "ray", "mlflow", "dvc", "boto3",
                       "pandas"]
BLOCK_ALL_BUT_TORCH_AND_PYDANTIC = """
import sys
class Block:
    def find_spec(self, name, *args):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('not installed on a GPU machine: ' + name)
sys.meta_path.insert(0, Block())
import benchmarks.gpu
print('ok')
"""


def test_gpu_benchmark_needs_only_torch_pydantic_and_components():
    done = subprocess.run([sys.executable, "-c", BLOCK_ALL_BUT_TORCH_AND_PYDANTIC.format(blocked=NOT_ON_GPU_MACHINES)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def _compiled_graphs_are_static(compile_fn) -> list[bool]:
    """Compile a hierarchical model at two sizes one after another in this process, as the GPU
    benchmark does over its rows; per captured graph, whether every input size is a plain int."""
    import torch

    from components.config import ModelConfig
    from components.models import build_model

    static = []

    def record(graph, example_inputs):
        static.append(not any(isinstance(x, torch.SymInt)
                              or (isinstance(x, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in x.shape))
                              for x in example_inputs))
        return graph.forward

    cfg = ModelConfig(method="hierarchical", train_scales=[0.5, 1.0], trunk="tiny", output_stride=8,
                      decoder_channels=8, attention_channels=8, num_classes=3)
    for side in (64, 96):
        compile_fn(build_model(cfg).train(), backend=record)(torch.randn(1, 3, side, side))
    torch._dynamo.reset()
    return static


def test_each_benchmark_row_compiles_with_static_sizes():
    # A plain torch.compile in the same process recompiles the second size with symbolic sizes.
    from benchmarks.steps import compile_static

    assert _compiled_graphs_are_static(compile_static) == [True, True]


def test_gpu_benchmark_runs_every_eager_row_before_any_compiled_one():
    # A run cut short by a time limit (each compile takes 1-2 minutes there) keeps the eager rows.
    from benchmarks.gpu import METHODS, MODELS, planned_runs

    runs = planned_runs(compile_too=True)
    compiled_flags = [compiled for *_, compiled in runs]
    assert compiled_flags == sorted(compiled_flags)
    assert len(runs) == sum(len(batches) + 1 for _, _, batches in MODELS.values()) * len(METHODS)
    assert runs[0][0] == "paper" and all(not compiled for *_, compiled in planned_runs(compile_too=False))


def test_gpu_benchmark_times_the_anchor_beside_the_paper_model_and_gives_the_targets_ratios():
    """Where torchvision is installed, torchvision's deeplabv3_resnet50 runs right after the paper's
    model, at its largest batch, eager and compiled; the ratios of utilisation the GPU targets are
    about come from the rows that ran; any model's training FLOPs are counted on the meta device."""
    import torch

    from benchmarks.gpu import ANCHOR, MODELS, module_train_flops, planned_runs, target_ratios

    runs = planned_runs(compile_too=True, anchor=True)
    batch = MODELS["paper"][2][-1]
    anchor_runs = [run for run in runs if run[0] == ANCHOR]
    assert anchor_runs == [(ANCHOR, "single", batch, False), (ANCHOR, "single", batch, True)]
    assert [compiled for *_, compiled in runs] == sorted(compiled for *_, compiled in runs)
    assert [run for run in runs if run[0] != ANCHOR] == planned_runs(compile_too=True)

    def row(model, method, tflops, compiled=False, at=batch):
        return {"model": model, "method": method, "batch": at, "achieved_tflops_per_s": tflops,
                "variant": "bf16 channels_last" + (" compiled" if compiled else "")}

    rows = [row("paper", "single", 200.0), row("paper", "hierarchical", 170.0), row(ANCHOR, "single", 160.0),
            row("paper", "single", 999.0, at=2), row("paper", "single", 250.0, compiled=True)]
    assert target_ratios(rows) == {"paper single over anchor, eager": 1.25,
                                   "paper hierarchical over single, eager": 0.85}  # no compiled pair ran

    def conv():  # 3 -> 19 channels, 1x1: 2 * 3 * 19 FLOPs per pixel forward, as many for the weights' gradient
        return torch.nn.Sequential(torch.nn.Conv2d(3, 19, 1, bias=False))

    def loss(output, target):
        return torch.nn.functional.cross_entropy(output, target)

    assert module_train_flops(conv, loss, (8, 8), 2) == 2 * (2 * 3 * 19 * 64 * 2)  # the image needs no gradient


def test_profile_covers_the_training_step_and_runs_without_yaml():
    """The profiler sees forward, loss and backward of a training step; `--model paper` (the GPU
    profile) imports nothing a GPU machine lacks."""
    from benchmarks.profile_step import profile_training_steps
    from components.config import ModelConfig

    cfg = ModelConfig(method="hierarchical", train_scales=[0.5, 1.0], trunk="tiny", output_stride=8,
                      decoder_channels=8, attention_channels=8, num_classes=3)
    ops = {event.key for event in profile_training_steps(cfg, (32, 32), 1, 1, None).key_averages()}
    assert {"aten::convolution", "aten::convolution_backward", "aten::nll_loss_forward"} <= ops
    code = BLOCK_ALL_BUT_TORCH_AND_PYDANTIC.format(blocked=NOT_ON_GPU_MACHINES).replace(
        "import benchmarks.gpu", "import benchmarks.profile_step")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_gpu_benchmark_models_are_the_paper_profile_and_the_default_params():
    """benchmarks.gpu keeps its own copy of both models (a GPU machine here has no PyYAML to read
    them); the copy must stay the profile's and params.yaml's, or its MFU is about another model."""
    import yaml

    from benchmarks.gpu import MODELS
    from pipeline.profile import apply_profile

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    paper = apply_profile(params, yaml.safe_load((ROOT / "infra" / "profiles" / "paper.yaml").read_text()))
    for name, source in (("paper", paper), ("default", params)):
        settings, crop, _ = MODELS[name]
        assert {key: source["model"][key] for key in settings} == settings, name
        assert list(crop) == source["train"]["crop_size"], name


def test_ray_overhead_is_the_median_of_paired_rounds():
    """Plain loop, one Ray worker and the plain loop again in rounds; one round slowed by a busy
    machine (here 1.40x) must not move the reported overhead, as it would a mean or a single
    comparison."""
    from benchmarks.orchestration import combine_rounds

    rounds = [{"ray_over_plain_epoch": ratio, "ray_over_plain_epoch_wall": ratio, "ray_over_plain_wall": 2 * ratio,
               "plain_after_over_before_epoch": control, "plain_training_cores": 1.95,
               "ray_training_cores": 1.95 / ratio, "ray_other_cores": 0.1 * ratio}
              for ratio, control in ((1.40, 0.80), (1.02, 1.01), (1.05, 1.0))]
    combined = combine_rounds(rounds)
    assert combined["ray_training_cores"] == 1.95 / 1.05 and combined["ray_other_cores"] == 0.1 * 1.05
    assert combined["ray_over_plain_epoch"] == combined["ray_over_plain_epoch_wall"] == 1.05
    assert combined["ray_over_plain_wall"] == 2.10 and combined["rounds"] == rounds
    assert combined["plain_after_over_before_epoch"] == 1.0


def test_cores_used_are_split_between_the_training_tree_and_the_rest_of_the_job():
    """A busy grandchild counts for the process it runs under (the training tree); an idle
    sibling adds almost nothing to the rest of the job; a process that started between the two
    snapshots counts from zero, one that ended is not seen. On snapshots made by hand, so the
    accounting is checked exactly whatever else the machine is doing (the benchmark measures)."""
    from benchmarks.process_cpu import Snapshot, cores_used, split_cores

    # job 10 -> training 20 -> loader worker 21; job 10 -> idle helper 30, raylet 40 (started in
    # the window); 50 belongs to another job; 60 ended before the second snapshot.
    parents = {10: 1, 20: 10, 21: 20, 30: 10, 40: 10, 50: 1, 60: 10}
    names = {10: "benchmarks", 20: "ray::TrainWorker", 21: "pt_data_worker", 30: "log_monitor.py",
             40: "raylet", 50: "other", 60: "gone"}
    before = Snapshot(100.0, {10: 1.0, 20: 5.0, 21: 2.0, 30: 0.5, 50: 9.0, 60: 3.0},
                      {p: names[p] for p in (10, 20, 21, 30, 50, 60)},
                      {p: parents[p] for p in (10, 20, 21, 30, 50, 60)}, {})
    after = Snapshot(102.0, {10: 1.02, 20: 6.0, 21: 3.9, 30: 0.52, 40: 0.2, 50: 13.0},
                     {p: names[p] for p in (10, 20, 21, 30, 40, 50)},
                     {p: parents[p] for p in (10, 20, 21, 30, 40, 50)}, {})
    split = split_cores(before, after, job_root=10, training_root=20)
    assert split["training_cores"] == pytest.approx((1.0 + 1.9) / 2)  # the worker and its loader child
    assert split["other_cores"] == pytest.approx((0.02 + 0.02 + 0.2) / 2)  # not the other job's 50
    assert split["others"] == {"raylet": 0.1, "benchmarks": 0.01, "log_monitor.py": 0.01}
    assert cores_used(before, after, {30}) == pytest.approx(0.01)
    assert cores_used(before, after, {60}) == 0.0  # ended in between: not seen


def test_the_process_table_sees_a_child_with_its_parent_and_command_line():
    import os

    from benchmarks import process_cpu

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        snap = process_cpu.snapshot()
        assert snap.parents[child.pid] == os.getpid() and child.pid in process_cpu.descendants(snap, os.getpid())
        assert "time.sleep(30)" in snap.command_lines[child.pid] and snap.cpu_s[child.pid] >= 0
    finally:
        child.kill()
        child.wait()


def test_process_labels_name_what_runs():
    from benchmarks.process_cpu import label

    assert label(["/venv/bin/python", "-u", "/venv/ray/_private/log_monitor.py", "--x"]) == "log_monitor.py"
    assert label(["ray::TrainController.run   "]) == "ray::TrainController.run"
    assert label(["ray-dashboard-StateHead-0 (/venv/bin/python -B -c from x)"]) == "ray-dashboard-StateHead-0"
    assert label(["/venv/bin/python3", "-m", "benchmarks"]) == "benchmarks"
    assert label(["/opt/ray/core/src/ray/raylet/raylet", "--raylet_socket_name=x"]) == "raylet"


# The Ray side (Ray, its Train and Tune) and the services (MLflow, S3) are blocked: the worker loop
# runs without them.
RUN_GPU_CHECK_WITHOUT_RAY = """
import runpy, sys
class Block:
    def find_spec(self, name, *args):
        if name.split('.')[0] in {{'ray', 'mlflow', 'dvc', 'boto3'}}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
sys.argv = ['gpu_check', '--images', '2', '--image-size', '96', '192', '--batch', '2', '--epochs', '1', '--steps',
            '1', '--output', {output!r}]
runpy.run_module('benchmarks.gpu_check', run_name='__main__')
"""


def test_gpu_check_runs_the_pipelines_worker_loop_without_ray(tmp_path):
    """benchmarks.gpu_check trains with the code every Ray Train worker runs (worker_loop.py) in a
    torch.distributed world of one (gloo here, NCCL on a GPU), on a pyramid it builds, and times the
    same model's bare training step beside it."""
    import json

    output = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "-c", RUN_GPU_CHECK_WITHOUT_RAY.format(output=str(output))], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(output.read_text())
    assert result["device"] == "cpu" and result["batch"] == 2 and result["crop"] == [192, 192]
    (epoch,) = result["epochs"]
    assert epoch["epoch"] == 1 and 0 <= epoch["val_miou"] <= 1 and epoch["step_seconds"] > 0
    assert {"weights.safetensors", "train_state.pt"} <= set(result["checkpoint_files"])  # rank 0 checkpointed
    assert result["benchmark_step_s"] > 0 and result["worker_over_benchmark"] > 0
    assert "worker loop" in done.stdout and "epoch 1/1: loss " in done.stderr


def test_train_compile_compiles_the_workers_model_in_place_where_it_is_on(tmp_path, capfd, monkeypatch):
    """train.compile: the worker compiles its model (nn.Module.compile, in place) where the setting
    is on (auto: on CUDA only; YAML's on/off are booleans), trains through the compiled model, keeps
    the eager parameter names in its checkpoints and says what the first, compiling, step took.
    Compiled here with Dynamo's eager backend: the same capture of the model, without Inductor's
    minute of C++ compilation on a CPU."""
    import torch
    import yaml
    from safetensors.torch import load_file

    from benchmarks.gpu_check import SingleProcessSession, check_config, small_pyramid
    from components.config import validate_config
    from components.models import build_model
    from components.training import compiles
    from pipeline.runtime.worker_loop import train_worker
    from tests.conftest import tiny_model_config

    assert yaml.safe_load("compile: on") == {"compile": True} and yaml.safe_load("compile: off") == {"compile": False}
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not compiles("auto", cpu) and compiles("auto", cuda) and compiles(True, cpu) and not compiles(False, cuda)

    compiled_models = []
    eager_compile = torch.nn.Module.compile

    def compile_with_dynamo_eager(module, *args, **kwargs):
        compiled_models.append(module)
        eager_compile(module, *args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_with_dynamo_eager)

    class Session(SingleProcessSession):
        def report(self, metrics, checkpoint_dir):
            super().report(metrics, checkpoint_dir)
            self.reports[-1]["weights"] = sorted(load_file(checkpoint_dir / "weights.safetensors"))

    pyramid = small_pyramid(tmp_path, 2, 64, 128)
    model = tiny_model_config(method="hierarchical")
    for setting, expected in (("auto", False), (True, True)):
        raw = check_config("default", "hierarchical", 1, 2, pyramid, setting)
        raw["model"].update(model.model_dump(mode="json", exclude={"num_classes"}))  # the data's own
        raw["train"].update(crop_size=[64, 64], steps_per_epoch=2)
        cfg = validate_config(raw, source="test")
        session = Session(cpu)
        train_worker(cfg, session, str(pyramid))
        assert bool(compiled_models) is expected, setting
        (report,) = session.reports
        assert report["weights"] == sorted(build_model(cfg.model).state_dict()), "checkpoint names changed"
        assert report["first_step_seconds"] > 0
    torch._dynamo.reset()
    logged = capfd.readouterr().err
    assert "torch.compile on cpu (train.compile: on)" in logged
    assert logged.count(": compiling)") == 1, logged  # only the compiled run's epoch says so
