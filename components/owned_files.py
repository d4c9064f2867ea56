"""What a file output may replace: a file of the kind its stage writes there, told by its content.

A marker beside the file would not survive `dvc checkout` (a copy or a link into DVC's cache); the
content does. So a user's notes, README.md, params.yaml or .git/config at an output path are refused,
not lost. pipeline/runtime/output_files.py says which recogniser each output uses.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from components.safe_files import read_regular

# Each recogniser reads a bounded amount (safe_files) and never raises.
Recogniser = Callable[[Path], bool]
MAX_RECOGNISED_BYTES = 16 << 20


def _read_bounded(path: Path) -> bytes | None:
    try:
        return read_regular(path, "output", MAX_RECOGNISED_BYTES)
    except (OSError, ValueError):  # missing, not a regular file, too large: not one of ours
        return None


def json_with(*keys: str) -> Recogniser:
    """A JSON object holding `keys`, or a list of such objects (a table's rows)."""
    def recognise(path: Path) -> bool:
        try:
            document = json.loads(_read_bounded(path) or b"")
        except ValueError:
            return False
        rows = document if isinstance(document, list) else [document]
        return all(isinstance(row, dict) and set(keys) <= set(row) for row in rows)
    return recognise


def yaml_with(*keys: str) -> Recogniser:
    """A YAML mapping holding `keys`."""
    def recognise(path: Path) -> bool:
        import yaml  # here: GPU benchmark machines have torch and pydantic only

        try:
            document = yaml.safe_load(_read_bounded(path) or b"")
        except (yaml.YAMLError, ValueError):
            return False
        return isinstance(document, dict) and set(keys) <= set(document)
    return recognise


def csv_with_header(*columns: str) -> Recogniser:
    """A CSV file whose header starts with `columns`."""
    def recognise(path: Path) -> bool:
        first = (_read_bounded(path) or b"").split(b"\n", 1)[0].decode(errors="replace").strip()
        return first.split(",")[: len(columns)] == list(columns)
    return recognise


def starting_with(prefix: bytes) -> Recogniser:
    """A file whose bytes start with `prefix` (a format's magic number, a table's first cells)."""
    def recognise(path: Path) -> bool:
        return (_read_bounded(path) or b"").startswith(prefix)
    return recognise


def check_replaceable(target: str | Path, recognise: Recogniser, key: str | None = None) -> None:
    """Refuse to replace the file `target` unless it is absent or `recognise` knows it as ours."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    name = f"{key} = {target}" if key else str(target)
    if not target.is_file():
        raise FileExistsError(f"{name}: is not a regular file; move it or choose another path")
    if not recognise(target):
        raise FileExistsError(f"{name}: holds a file this pipeline did not write there (its content is not "
                              "the output's); move it or choose another path")
