"""What every stage shares: reading params.yaml once, and failing with one clear line."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable

from components.config import ConfigError, load_config
from components.redact import redact
from pipeline.errors import ClusterError

# Errors that are the user's to fix (a key, a path, a cluster setting): one line, no traceback.
USER_ERRORS = (ConfigError, ClusterError, FileNotFoundError, FileExistsError, ValueError, KeyError,
               ConnectionError)


def run_stage(main: Callable[..., None], description: str,
              add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Parse `--params` (and a stage's own arguments), validate the whole config, run the stage.

    `main(cfg)` or, when the stage adds arguments, `main(cfg, args)`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="the parameters file (default: params.yaml)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error that is otherwise reported in one line")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    # SIGTERM (a scheduler, `kill`, Ray job stop) unwinds like Ctrl-C, so MLflow runs end as KILLED.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        cfg = load_config(args.params)
        main(cfg, args) if add_arguments is not None else main(cfg)
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"error: {redact(err)}", file=sys.stderr)
        sys.exit(1)
