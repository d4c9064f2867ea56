"""Every DVC stage depends on every project module its command imports, directly or not.

A module missing from a stage's `deps` means a code change that alters the stage's result does not
rerun it, and `dvc repro` serves a stale output as current. The imports are read from the source
(every `import` statement, also those inside functions), so this needs no import of the pipeline.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.dvc_helpers import ROOT

PROJECT_PACKAGES = ("components", "pipeline")
# Files a module loads by path rather than by import: MLflow logs serving_model.py as the model's code.
LOADED_BY_PATH = {"pipeline/runtime/tracking.py": ["pipeline.runtime.serving_model"]}


def module_file(module: str) -> Path | None:
    """The file that defines a project module (a .py file or a package's __init__.py), else None."""
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Module names one file imports, including the submodules named by `from package import name`
    (which may be a module or an attribute: both are returned, non-modules are dropped later)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def files_imported_by(module: str) -> set[Path]:
    """Every project file executed when `module` is imported: the transitive closure, with the
    `__init__.py` of every package on the way."""
    seen: set[Path] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ first
            file = module_file(".".join(parts[:depth]))
            if file is not None and file not in seen:
                seen.add(file)
                pending.extend(imported_modules(file))
                pending.extend(LOADED_BY_PATH.get(str(file.relative_to(ROOT)), []))
    return {file for file in seen if not only_a_docstring(file)}


def only_a_docstring(path: Path) -> bool:
    """A package __init__ with nothing but its docstring cannot change a result; no dep needed."""
    body = ast.parse(path.read_text()).body
    return len(body) <= 1 and all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                                  for node in body)


def stage_commands() -> dict[str, tuple[str, list[str]]]:
    """Stage name -> (command, deps as paths relative to the repository), as DVC resolves them."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return {stage.addressing: (stage.cmd, [str(Path(dep.def_path)) for dep in stage.deps])
                for stage in repo.index.stages}


def missing_deps(command: str, deps: list[str]) -> list[str]:
    """Project files that `command` (python -m package.module ...) imports but `deps` does not cover."""
    match = re.match(r"python -m ([\w.]+)", command)
    assert match, f"stage command {command!r} is not `python -m module`"
    needed = files_imported_by(match.group(1))
    dep_paths = [ROOT / d for d in deps]
    return sorted(str(f.relative_to(ROOT)) for f in needed
                  if not any(f == d or d in f.parents for d in dep_paths))


STAGES = stage_commands()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_depends_on_every_module_it_imports(stage):
    command, deps = STAGES[stage]
    missing = missing_deps(command, deps)
    assert not missing, f"dvc.yaml stage {stage!r} imports these but does not list them in deps: {missing}"


def test_a_removed_dep_is_found():
    command, deps = STAGES["train"]
    assert "pipeline/runtime/trainer.py" in deps
    trainer = "pipeline/runtime/trainer.py"
    assert missing_deps(command, [d for d in deps if d != trainer]) == [trainer]
    # a directory dep covers the files under it; without it each of them is missing
    assert "components/models" in deps
    lost = missing_deps(command, [d for d in deps if d != "components/models"])
    assert "components/models/fusion.py" in lost and "components/models/__init__.py" in lost


def test_imports_inside_functions_count():
    # pipeline.runtime.serving_model imports components.models inside load_context
    assert ROOT / "components/models/__init__.py" in files_imported_by("pipeline.runtime.serving_model")


def test_the_table_depends_on_every_row_of_the_ablation():
    """Each row of ablation.methods is its own `ablation-run@<row>` stage; the table stage must
    depend on every row's folder, or `dvc repro ablation` builds the table before a new row ran."""
    from components.config import load_config

    cfg = load_config(ROOT / "params.yaml")
    _, deps = STAGES["ablation"]
    rows = {f"{cfg.ablation.output_dir}/{row}" for row in cfg.ablation.methods}
    assert rows - set(deps) == set(), f"dvc.yaml stage 'ablation' lacks deps {sorted(rows - set(deps))}"
    assert {f"ablation-run@{row}" for row in cfg.ablation.methods} <= set(STAGES)


def stage_modules() -> set[str]:
    """The modules dvc.yaml runs as stages (`python -m pipeline.<stage>`)."""
    return {re.match(r"python -m ([\w.]+)", command).group(1) for command, _ in STAGES.values()}


def test_no_stage_imports_another_stage():
    """What two stages share lives in a module of its own that dvc.yaml lists for both (DESIGN
    section 5): a stage that imports another runs that stage's code under its own name, and an edit
    to one stage's main reruns both."""
    stages = stage_modules()
    assert {"pipeline.train", "pipeline.evaluate", "pipeline.ablation"} <= stages
    crossings = {}
    for stage in sorted(stages):
        other_stages = {name for name in imported_modules(module_file(stage)) if name in stages - {stage}}
        if other_stages:
            crossings[stage] = sorted(other_stages)
    assert crossings == {}, f"stage modules that import other stages: {crossings}"
