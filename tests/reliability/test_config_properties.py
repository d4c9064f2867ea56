"""Property tests of the config loader: whatever YAML (or bytes) sits in params.yaml, the loader
returns a validated config or raises ConfigError, one message that names the key or the file."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.config import ConfigError, load_config

DEFAULT_PARAMS = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
SECTIONS = sorted(DEFAULT_PARAMS)
KEYS = sorted({key for section in DEFAULT_PARAMS.values() if isinstance(section, dict) for key in section})

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["resnet18", "s3://b/p", "../..", "/", "", "auto"]))
# Keys drawn mostly from the real ones, so a tree reaches the validators and not only "unknown key".
keys = st.one_of(st.sampled_from(SECTIONS + KEYS), st.text(max_size=12))
trees = st.recursive(scalars, lambda children: st.one_of(st.lists(children, max_size=4),
                                                           st.dictionaries(keys, children, max_size=5)),
                     max_leaves=25)

# database=None: nothing written into the checkout (examples are drawn afresh each run)
PROPERTY = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def load_text(text: str | bytes):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "params.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return load_config(path), str(path)


def outcome(text):
    """The loaded config, or the ConfigError's message; any other exception fails the test."""
    try:
        return load_text(text)[0]
    except ConfigError as err:
        message = str(err)
        assert message and "Traceback" not in message
        return message


@PROPERTY
@given(trees)
def test_any_yaml_tree_is_a_config_or_a_config_error(tree):
    outcome(yaml.safe_dump(tree, allow_unicode=True))


@PROPERTY
@given(st.binary(max_size=200))
def test_any_bytes_are_a_config_or_a_config_error(data):
    outcome(data)


def _leaves(tree, prefix=()):
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from _leaves(value, (*prefix, key))
    else:
        yield prefix


LEAVES = [path for path in _leaves(DEFAULT_PARAMS) if len(path) >= 2]


@PROPERTY
@given(st.sampled_from(LEAVES), trees)
def test_a_bad_value_anywhere_is_named_by_its_key(path, value):
    """Replace one value of the shipped params.yaml: the config loads, or the error names that key."""
    params = yaml.safe_load(yaml.safe_dump(DEFAULT_PARAMS))
    node = params
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    result = outcome(yaml.safe_dump(params, allow_unicode=True))
    if isinstance(result, str):
        assert any(str(key) in result for key in path), (path, value, result)
