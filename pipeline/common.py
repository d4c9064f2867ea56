"""What every stage shares: reading params.yaml once, and failing with one clear line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from components.config import ConfigError, PipelineConfig, load_config
from pipeline.cluster import ClusterError


def run_stage(main: Callable[[PipelineConfig], None], description: str) -> None:
    """Parse `--params`, validate the whole config, run the stage; user errors exit 1 without a traceback."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="the parameters file (default: params.yaml)")
    args = parser.parse_args()
    try:
        cfg = load_config(args.params)
        main(cfg)
    except (ConfigError, ClusterError, FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
