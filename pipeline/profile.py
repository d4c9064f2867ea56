"""Turn a profile (a YAML file of params.yaml sections, e.g. infra/profiles/paper.yaml) into the
`-S section.key=value` arguments of `dvc exp run`, after checking that params.yaml with the profile
applied is a valid configuration:

    dvc exp run $(python -m pipeline.profile infra/profiles/paper.yaml) ablation
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import yaml

from components.config import ConfigError, validate_config


def profile_overrides(profile: dict, params: dict) -> list[str]:
    """{"train": {"loss": "rmi"}} -> ["train.loss=rmi"]; values as JSON (lists, numbers, strings),
    which is what `dvc exp run -S` parses (as Hydra overrides; a key params.yaml does not have yet
    is added with a leading "+")."""
    overrides = []
    for section, values in profile.items():
        if not isinstance(values, dict):
            raise ConfigError(f"profile: section {section!r} must be a mapping of keys, got {values!r}")
        for key, value in values.items():
            text = value if isinstance(value, str) else json.dumps(value)
            new = key not in (params.get(section) or {})
            overrides.append(f"{'+' if new else ''}{section}.{key}={text}")
    return overrides


def apply_profile(params: dict, profile: dict) -> dict:
    merged = {section: dict(values) if isinstance(values, dict) else values for section, values in params.items()}
    for section, values in profile.items():
        merged.setdefault(section, {}).update(values)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", help="a YAML file of params.yaml sections")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    try:
        profile = yaml.safe_load(Path(args.profile).read_text()) or {}
        params = yaml.safe_load(Path(args.params).read_text()) or {}
        validate_config(apply_profile(params, profile), source=f"{args.params} with {args.profile}")
        overrides = profile_overrides(profile, params)
    except (OSError, ConfigError, yaml.YAMLError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(" ".join(f"-S {shlex.quote(o)}" for o in overrides))


if __name__ == "__main__":
    main()
