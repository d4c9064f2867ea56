"""Record what a locked package requires, from the index's wheel metadata (PEP 658: no download).

    python infra/scripts/wheel_requires.py requirements-gpu.lock torch > infra/locks/gpu-requires.json

Writes {"torch==2.13.0": [Requires-Dist lines], ...} for the package at its locked version and for
every package it requires with extras (cuda-toolkit[cublas,...]), at their locked versions, as
published for Linux x86_64 / CPython 3.11. tests/test_infra.py checks that the GPU lock pins
every requirement that applies there.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from pathlib import Path

INDEX = "https://pypi.org/simple"


def locked_versions(lock_file: str) -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", Path(lock_file).read_text(), flags=re.MULTILINE)
    return {normalize(name): version for name, version in pins}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requires_dist(name: str, version: str) -> list[str]:
    request = urllib.request.Request(f"{INDEX}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    prefix = f"{name.replace('-', '_')}-{version}-".lower()
    for file in files:
        filename = file["filename"].lower()
        linux_cp311 = "cp311" in filename and "manylinux" in filename and "x86_64" in filename
        if filename.startswith(prefix) and (linux_cp311 or filename.endswith("-any.whl")):
            with urllib.request.urlopen(file["url"] + ".metadata", timeout=60) as response:
                lines = response.read().decode().splitlines()
            return [line.removeprefix("Requires-Dist:").strip() for line in lines if line.startswith("Requires-Dist:")]
    raise SystemExit(f"no Linux x86_64 / CPython 3.11 wheel of {name}=={version} on {INDEX}")


def main(lock_file: str, package: str) -> dict[str, list[str]]:
    versions = locked_versions(lock_file)
    top = requires_dist(package, versions[normalize(package)])
    recorded = {f"{package}=={versions[normalize(package)]}": top}
    for line in top:
        with_extras = re.match(r"([A-Za-z0-9_.\-]+)\[", line)
        if with_extras:
            name = with_extras.group(1)
            recorded[f"{name}=={versions[normalize(name)]}"] = requires_dist(name, versions[normalize(name)])
    return recorded


if __name__ == "__main__":
    json.dump(main(*sys.argv[1:3]), sys.stdout, indent=1)
    print()
