"""What every stage shares: reading params.yaml once, and failing with one clear line."""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

from components.config import ConfigError, load_config
from components.redact import redact
from pipeline.runtime.errors import ClusterError, SearchFailedError

VERBOSE_VARIABLE = "HMSA_VERBOSE"  # "1" (a stage's --verbose): Ray's and MLflow's own INFO lines too

# Errors that are the user's to fix (a key, a path, a cluster setting): one line, no traceback.
USER_ERRORS = (ConfigError, ClusterError, SearchFailedError, FileNotFoundError, FileExistsError, ValueError, KeyError,
               ConnectionError)


def verbose() -> bool:
    return os.environ.get(VERBOSE_VARIABLE) == "1"


def quiet_library_logs() -> None:
    """Unless verbose: MLflow's INFO lines (its database's set-up, an input example's validation)
    and its download progress bars stay out of a stage's log; its warnings and errors do not. Set
    in the environment, so the processes the stage starts (a local Ray's workers) inherit it; a
    user's own MLFLOW_LOGGING_LEVEL wins. Ray's side: ray_session.connect, trainer.build_trainer and
    search_batches.new_tuner."""
    if verbose():
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if "mlflow" in sys.modules:  # configured on import: too late for the variable alone
        logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"])


def log_variables() -> dict[str, str]:
    """The settings above, for the job's processes on other nodes of a cluster (which inherit
    nothing from this one): --verbose reaches a Tune trial's Train controller and workers too."""
    names = (VERBOSE_VARIABLE, "MLFLOW_LOGGING_LEVEL", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    return {name: os.environ[name] for name in names if name in os.environ}


def run_stage(main: Callable[..., None], description: str,
              add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Parse `--params` (and a stage's own arguments), validate the whole config, run the stage.

    `main(cfg)` or, when the stage adds arguments, `main(cfg, args)`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="the parameters file (default: params.yaml)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error that is otherwise reported in one line")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's and MLflow's own INFO lines (Ray Train's per report, checkpoint, "
                             "worker start and retry decision; MLflow's database set-up and downloads)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    if args.verbose:
        os.environ[VERBOSE_VARIABLE] = "1"
    quiet_library_logs()
    # SIGTERM (a scheduler, `kill`, Ray job stop) unwinds like Ctrl-C, so MLflow runs end as KILLED.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Ctrl-C unwinds (temporaries removed, runs marked KILLED) however the stage was started: a
    # process started in the background by a shell inherits SIGINT ignored, and Python then keeps it so.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Credentials in the tracking URI move to MLflow's own variables before anything reads the URI.
    move_uri_credentials()
    try:
        cfg = load_config(args.params)
        main(cfg, args) if add_arguments is not None else main(cfg)
    except KeyboardInterrupt:
        if args.debug:
            raise
        # What the stage started has been unwound on the way here (runs marked KILLED, temporaries
        # removed); a local Ray it started stops at exit. Where it was stopped is no one's bug.
        stop_forwarding_ray_output()
        print("interrupted: the stage stopped; its outputs are as they were before it ran (run it again to go on)",
              file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if args.debug or not is_user_error(err):
            raise  # our own bug: the traceback is what it takes to fix it
        stop_forwarding_ray_output()
        print(f"error: {redact(err)}", file=sys.stderr)
        sys.exit(1)
    finally:
        skip_the_collection_at_exit()


def skip_the_collection_at_exit() -> None:
    """The stage's work is done (or has failed): leave what is still alive out of the full garbage
    collection that Python's exit runs. With torch, Ray and MLflow loaded that pass alone took about
    1.1 of the 1.6 CPU-s a stage process spent after its last line, on every stage of every run.
    Exit handlers (Ray's shutdown, MLflow's, logging's flush) still run; objects left in reference
    cycles are not finalized, which Python does not promise at exit either."""
    gc.freeze()


@contextlib.contextmanager
def ctrl_c_stays_an_interrupt():
    """Around Ray's `fit()` (a training's or a search's) in the main thread: Ctrl-C stops the stage
    as it does anywhere else.

    Ray puts its own SIGINT handler in place while it fits. Ray Train's aborts the run's controller
    and ends the process with `sys.exit`, which unwound the stage with exit status 1 and no word;
    Ray Tune's stops the search and fit() returns what the trials reached, which the stage took
    for a finished search (and, all trials cut short, failed with a traceback). Here both become
    the KeyboardInterrupt they stand for: MLflow runs are marked KILLED, run_stage says
    "interrupted" and exits 130, and the next run of the stage resumes. The stage's own handler
    comes back after fit. The signals that arrived are read from Python's wakeup file descriptor,
    which sees every signal whichever handler is in place. In another thread (the ablation's seeds
    side by side) Ray installs no handler, and Ctrl-C reaches the main thread as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ours = signal.getsignal(signal.SIGINT)
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    try:
        yield
    except SystemExit:
        if signal.SIGINT not in _signals_received(read_end):
            raise
        raise KeyboardInterrupt from None
    else:
        if signal.SIGINT in _signals_received(read_end):
            raise KeyboardInterrupt
    finally:
        signal.set_wakeup_fd(previous)
        signal.signal(signal.SIGINT, ours)
        os.close(read_end)
        os.close(write_end)


def _signals_received(read_end: int) -> set[int]:
    received = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(read_end, 512):
            received += chunk
    return set(received)


def stop_forwarding_ray_output() -> None:
    """Disconnect from Ray, if this process is connected, before the error line is printed.

    Ray forwards its processes' output to the driver some moments after they write it (a controller's
    last state change comes after the driver already holds the result). Disconnecting prints what has
    arrived and stops the rest, so the error line stays the last line the user sees."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def move_uri_credentials(environ=None) -> None:
    """MLFLOW_TRACKING_URI = scheme://user:password@host becomes the bare URI plus
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (which the MLflow client sends as basic auth),
    before anything reads it: the URI is then safe to print, log, store and hand to workers."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    env = os.environ if environ is None else environ
    uri = env.get("MLFLOW_TRACKING_URI") or ""
    parts = urlsplit(uri)
    if not parts.scheme.startswith("http") or "@" not in parts.netloc:
        return
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    env["MLFLOW_TRACKING_URI"] = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    env["MLFLOW_TRACKING_USERNAME"] = unquote(user)
    if password:
        env["MLFLOW_TRACKING_PASSWORD"] = unquote(password)


# OSErrors a user fixes (free space, permissions, a read-only mount), as opposed to our bugs.
USER_OS_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def is_user_error(err: BaseException) -> bool:
    """Errors that are the user's to fix: one line, no traceback (a bad key, path, setting, a full
    disk, a service that refused: MLflow's own errors name what it refused)."""
    if isinstance(err, USER_ERRORS):
        return True
    if isinstance(err, OSError) and err.errno in USER_OS_ERRNOS:
        return True
    return type(err).__module__.split(".")[0] == "mlflow"
