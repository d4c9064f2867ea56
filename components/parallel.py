"""Independent jobs (one per image, one per shard) on several processes of this machine, in order.

The data stages (generating the synthetic set, prepare, pyramid) spend their time in per-image work
that holds one image at a time: `map_in_order` spreads it over `workers` processes and hands back the
results in job order, so what the stage writes does not depend on how many processes wrote it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, which a container or `taskset` narrows)."""
    return len(os.sched_getaffinity(0))


# Ctrl-C (SIGINT) and SIGTERM, which the stages turn into an exception that removes their temporaries.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _stop_signals_deferred() -> Iterator[None]:
    """Note Ctrl-C and SIGTERM while the workers are forked, and deliver them after. Python runs the
    handler of a signal that lands during a fork inside an at-fork hook, which prints and swallows
    its KeyboardInterrupt (the stage then ran to the end and published its output), or raises it
    half-way through starting a worker (the stage then hung at exit, waiting for that worker).
    Masking the signal would not do: it is delivered to another thread, and its handler still runs.
    Off the main thread, no handler can run during the fork, and none can be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {number: signal.signal(number, lambda number, _frame: noted.append(number))
                for number in _STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if noted:
            signal.raise_signal(noted[0])


def _start_worker() -> None:
    """Worker processes end with the stage, even when it is killed (SIGKILL runs no clean-up): an
    orphan would go on writing, and hold the output's lock, which it inherited."""
    import ctypes

    import cv2

    # A worker stops at once on Ctrl-C or SIGTERM: the stage removes what it wrote.
    for number in _STOP_SIGNALS:
        signal.signal(number, signal.SIG_DFL)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the call above
        os._exit(1)
    cv2.setNumThreads(1)  # one core per process: throughput grows with processes, not threads


def run_jobs(function: Callable[[Any], Any], jobs: Sequence[Any], workers: int,
             on_result: Callable[[Any], None] | None = None) -> list:
    """function(job) for every job, on up to `workers` processes; results in job order. The first
    failing job (in job order) raises its exception here; `on_result` sees each result as it comes."""
    results = []
    with contextlib.closing(map_in_order(function, jobs, workers)) as ordered:
        for result in ordered:
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results


def map_in_order(function: Callable[[Any], Any], jobs: Sequence[Any], workers: int,
                 ahead: int = 2) -> Generator[Any, None, None]:
    """function(job) for every job on up to `workers` processes, yielded in job order as they finish;
    at most `ahead` results per process wait to be taken, so a consumer that writes each result holds
    a bounded few in memory. Closing the generator stops the processes."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield function(job)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    import cv2

    # fork: a spawned worker re-imports the stage (pydantic, the config) before its first job, which
    # cost more than a shard of 8 Cityscapes images here. cv2's thread pool does not survive a fork
    # (a child's first cv2 call hung once the parent had used it), so the parent runs cv2 on one
    # thread while it forks, and the workers keep to one thread each.
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("fork"),
                               initializer=_start_worker)
    try:
        remaining = iter(jobs)
        with _stop_signals_deferred():  # the first submit forks every worker
            running = deque(pool.submit(function, job) for job in itertools.islice(remaining, workers * ahead))
        cv2.setNumThreads(threads)
        while running:
            result = running.popleft().result()
            for job in itertools.islice(remaining, 1):
                running.append(pool.submit(function, job))
            yield result
    finally:
        cv2.setNumThreads(threads)
        pool.shutdown(wait=True, cancel_futures=True)
