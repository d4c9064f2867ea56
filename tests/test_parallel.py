"""components.parallel: per-image and per-shard jobs on several processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from components.parallel import run_jobs


def _square(number: int) -> int:
    return number * number


def _fail_on_three(number: int) -> int:
    if number == 3:
        raise ValueError(f"job {number} failed")
    return number


def test_results_come_back_in_job_order_whatever_the_processes():
    jobs = list(range(40))
    assert run_jobs(_square, jobs, workers=2) == run_jobs(_square, jobs, workers=1) == [n * n for n in jobs]


def test_a_failing_job_raises_its_own_exception():
    with pytest.raises(ValueError, match="job 3 failed"):
        run_jobs(_fail_on_three, list(range(8)), workers=2)


def test_ctrl_c_that_lands_while_the_workers_are_forked_stops_the_stage():
    """A Ctrl-C delivered during the fork of a worker (here, from an at-fork hook: where it landed by
    chance in a CI run) must still stop the jobs with KeyboardInterrupt. Python ran its handler inside
    the hook and swallowed the exception, so the stage finished and published its output."""
    script = textwrap.dedent("""
        import os, signal, time
        from components.parallel import run_jobs

        signal.signal(signal.SIGINT, signal.default_int_handler)
        forks = []

        def ctrl_c_during_the_first_fork():
            forks.append(1)
            if len(forks) == 1:
                signal.raise_signal(signal.SIGINT)

        os.register_at_fork(after_in_parent=ctrl_c_during_the_first_fork)
        try:
            run_jobs(time.sleep, [0.2] * 40, workers=2)
        except KeyboardInterrupt:
            print("interrupted")
        else:
            print("ran to the end")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "interrupted", result.stdout + result.stderr
