"""Timing training steps of one model in this process: the building block of the benchmarks."""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Callable

import torch

from components.config import ModelConfig
from components.losses import segmentation_loss
from components.models import build_model


def training_step(cfg: ModelConfig, size: tuple[int, int], batch: int, dtype: torch.dtype | None = None,
                  channels_last: bool = True, device: str = "cpu", wrap=None) -> Callable[[], None]:
    """One training step (forward, loss, backward, SGD) of a freshly built model on a fixed batch
    of random images, as a function to call: what one minibatch of this model costs, without data
    loading. `wrap` (e.g. compile_static) is applied to the built model."""
    torch.manual_seed(0)
    return module_training_step(build_model(cfg), lambda output, target: segmentation_loss(output, target, cfg),
                                cfg.num_classes, size, batch, dtype, channels_last, device, wrap)


def module_training_step(model: torch.nn.Module, loss_of: Callable, num_classes: int, size: tuple[int, int],
                         batch: int, dtype: torch.dtype | None = None, channels_last: bool = True,
                         device: str = "cpu", wrap=None) -> Callable[[], None]:
    """training_step for any segmentation model: `loss_of(output, target)` turns its output into
    the loss (another library's model, timed beside ours)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.train().to(device=device, memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if wrap is not None:
        model = wrap(model)
    image = torch.randn(batch, 3, *size, device=device).contiguous(memory_format=fmt)
    target = torch.randint(0, num_classes, (batch, *size), device=device)

    def step() -> None:
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            output = model(image)
        loss = loss_of(output, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_step(step: Callable[[], None], steps: int, warmup: int = 2, device: str = "cpu") -> list[float]:
    """Seconds of each of `steps` calls of `step` after `warmup` untimed ones."""
    timings = []
    for index in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if index >= warmup:
            timings.append(time.perf_counter() - start)
    return timings


def compiled_step_seconds(step: Callable[[], None], steps: int, device: str = "cpu") -> tuple[float, float]:
    """(median step seconds, compile seconds) of a step whose model is compiled: the first call
    compiles (the second may still recompile a little), so the median is of the `steps` calls after
    those two, and the first call's excess over it is the compile time."""
    timings = time_step(step, steps + 2, warmup=0, device=device)
    step_seconds = median(timings[2:])
    return step_seconds, timings[0] - step_seconds


def time_training_steps(cfg: ModelConfig, size: tuple[int, int], batch: int, steps: int, warmup: int = 2,
                        dtype: torch.dtype | None = None, channels_last: bool = True,
                        device: str = "cpu", wrap=None) -> list[float]:
    """Seconds of each of `steps` training steps (see training_step) after `warmup` untimed ones."""
    return time_step(training_step(cfg, size, batch, dtype, channels_last, device, wrap), steps, warmup, device)


def compile_static(model: torch.nn.Module, backend: str | Callable = "inductor") -> torch.nn.Module:
    """torch.compile for one benchmark row, compiled as a fresh process would compile it.

    Dynamo keys its cache by the forward's code, which every model of a class shares: in a process
    that already compiled one, a second model or size of that class is recompiled with symbolic
    sizes (slower kernels, a longer compile), and that would be measured as the model's own. So the
    caches are cleared first and every size is static (benchmark shapes never change)."""
    torch._dynamo.reset()
    return torch.compile(model, dynamic=False, backend=backend)


def in_fresh_process(target: Callable, *args):
    """target(*args, queue) in a newly spawned interpreter (not daemonic, so it may start loader
    workers); returns what it put on the queue. Nothing of this process's state (threads, caches,
    allocations) is in it, which is what a benchmark that measures a process's own cost needs."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=target, args=(*args, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def median(values: list[float]) -> float:
    return statistics.median(values)


def matmul_flops_per_second(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 8,
                            device: str = "cpu") -> float:
    """Dense square matrix-multiply FLOP/s with this process's threads: the machine's practical peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    timings = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    return 2 * n**3 / median(timings)


def conv_matmul_flops_per_second(dtype: torch.dtype = torch.float32, channels: int = 1024, side: int = 64,
                                 repeats: int = 8) -> float:
    """The same dense product as a 1x1 convolution (channels x channels weights over side^2 pixels),
    through the convolution library the model's layers use: on some CPUs torch.mm's BLAS is slower
    than oneDNN, and the faster of the two is the machine's practical peak."""
    conv = torch.nn.Conv2d(channels, channels, 1, bias=False).to(dtype)
    x = torch.randn(1, channels, side, side, dtype=dtype).contiguous(memory_format=torch.channels_last)
    conv = conv.to(memory_format=torch.channels_last)
    timings = []
    with torch.no_grad():
        for step in range(repeats + 2):
            start = time.perf_counter()
            conv(x)
            if step >= 2:
                timings.append(time.perf_counter() - start)
    return 2 * channels * channels * side * side / median(timings)
