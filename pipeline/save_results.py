"""Keep what `dvc repro` wrote outside the DVC cache when the checkout itself will not survive
(a RayJob's head pod, a `ray up` head node that is torn down): `dvc.lock` and the small results
that git would carry (metrics, curves, decisions), copied to HMSA_STORAGE/results/<commit>/.

    python -m pipeline.save_results        # after `dvc repro` and `dvc push`

The cached outputs (pyramid, models, attention pictures) go through `dvc push`; MLflow holds the
runs and the registry. With both, nothing of a run lives only in the pod.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from components.storage import join
from pipeline.runtime.environment import Environment

SMALL_RESULTS = ("*.json", "*.csv", "*.yaml", "*.md")


def result_files(root: Path) -> list[Path]:
    files = [root / "dvc.lock"] if (root / "dvc.lock").is_file() else []
    for pattern in SMALL_RESULTS:
        files += sorted((root / "results").rglob(pattern))
    return files


def main() -> None:
    env = Environment.from_environ()
    if not env.storage_root:
        sys.exit("error: HMSA_STORAGE is not set: there is nowhere shared to keep the results")
    root = Path.cwd()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "no-git"
    target = join(env.storage_root, "results", commit)
    storage = env.storage(target)
    files = result_files(root)
    for file in files:
        storage.write_bytes(join(target, file.relative_to(root).as_posix()), file.read_bytes())
    print(f"saved {len(files)} result files to {target}")


if __name__ == "__main__":
    main()
