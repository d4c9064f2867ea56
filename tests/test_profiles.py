"""Profiles (infra/profiles/*.yaml) are valid on top of params.yaml, and the `-S` arguments they
become make exactly the same params.yaml when DVC applies them."""

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.config import load_config
from pipeline.profile import apply_profile

ROOT = Path(__file__).resolve().parent.parent
PROFILES = sorted((ROOT / "infra" / "profiles").glob("*.yaml"))


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_profile_arguments_make_the_profiled_params(tmp_path, profile):
    from dvc.utils.hydra import apply_overrides

    done = subprocess.run([sys.executable, "-m", "pipeline.profile", str(profile)], capture_output=True,
                          text=True, cwd=ROOT, check=True)
    arguments = shlex.split(done.stdout)
    assert arguments[0] == "-S" and len(arguments) % 2 == 0
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    apply_overrides(params, arguments[1::2])  # what `dvc exp run -S` does to params.yaml
    expected = apply_profile(yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load(profile.read_text()))
    assert yaml.safe_load(params.read_text()) == expected
    load_config(params)


def test_an_invalid_profile_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  crop_size: [1023, 1023]\n")
    done = subprocess.run([sys.executable, "-m", "pipeline.profile", str(bad)], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 1 and "train.crop_size = [1023, 1023]" in done.stderr, done.stderr
