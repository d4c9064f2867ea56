"""Stage `register`: the trained model into the MLflow registry, promoted only when it is better.

The served scale set is register.scale_set: by default the inference-scale search's recommendation
(`eval_scales.yaml` of the eval-scales stage), else an explicit set among evaluate.scale_sets. The
registered model serves that set when a caller passes none, and its mIoU and GFLOPs at that set gate
promotion: the candidate becomes `champion` only if its GFLOPs are within register.max_gflops and
its mIoU beats the current champion's (at the champion's own served set) beyond the noise of the val
images: a paired bootstrap over the images (components.significance, register.bootstrap_rounds
rounds) of both models' per-image confusion matrices, whose 95% interval of the mIoU difference
must lie above register.min_delta. The interval is reported with the decision. Each version keeps
its per-image matrices as an artifact of its training run (tag `gate_images`), to judge the next
candidate. The old champion then keeps the alias `previous` (and `challenger`, which lost to it, is
removed). Otherwise the candidate is aliased `challenger`. A candidate of another
dataset than the champion's, or whose training run is in another tracking store, is refused.
The same weights with the same served set registered twice reuse their version (matched by the
SHA-256 of the weights). A failure after a version was created deletes it again: no
half-registered models.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import yaml

from components.atomic import atomic_file
from components.config import PipelineConfig
from components.gate import decide, noise_bound
from components.models.saved import WEIGHTS_FILE
from components.redact import redact
from components.scales import scale_set_key
from pipeline import output_files, tracking
from pipeline.common import run_stage
from pipeline.environment import Environment


def _champion(client, name: str) -> dict | None:
    version = _version_by_alias(client, name, "champion")
    if version is None:
        return None
    return {"version": version.version, "miou": float(version.tags["val_miou"]),
            "gflops": float(version.tags["gflops"]), "dataset": version.tags.get("dataset_manifest", ""),
            "run_id": version.run_id, "gate_images": version.tags.get("gate_images")}


def _champion_matrices(champion: dict) -> np.ndarray | None:
    """The champion's per-image confusion matrices, from its training run's artifacts (None for a
    version registered before versions kept them)."""
    import mlflow

    if not champion.get("gate_images"):
        return None
    with tempfile.TemporaryDirectory(prefix="hmsa-gate-") as directory:
        local = mlflow.artifacts.download_artifacts(run_id=champion["run_id"], artifact_path=champion["gate_images"],
                                                    dst_path=directory)
        return np.load(local)


def served_evaluation(cfg: PipelineConfig) -> dict:
    """{scales, miou, gflops, source, image_matrices} of the scale set the registered model will
    serve; image_matrices are its per-image confusion matrices (images, C, C)."""
    rc = cfg.register
    if rc.scale_set == "recommended":
        path = Path(cfg.tune.output_dir) / "eval_scales.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no inference-scale search to take register.scale_set = recommended "
                                    "from (run the eval-scales stage, or set register.scale_set to a list)")
        document = yaml.safe_load(path.read_text()) or {}
        recommended = document.get("recommended")
        if not recommended:
            raise ValueError(f"{path}: no recommended scale set (none is within tune.max_eval_gflops); raise "
                             "that limit or set register.scale_set to a list")
        return {"scales": [float(s) for s in recommended["scales"]], "miou": float(recommended["miou"]),
                "gflops": float(recommended["gflops"]), "source": str(path),
                "image_matrices": _recommended_matrices(path, document, recommended["name"])}
    path = Path(cfg.evaluate.output_dir) / "metrics.json"
    key = scale_set_key(rc.scale_set)
    evaluation = json.loads(path.read_text()).get(key)
    if evaluation is None:
        raise KeyError(f"{path} has no evaluation at register.scale_set = {rc.scale_set} (rerun evaluate)")
    return {"scales": list(rc.scale_set), "miou": float(evaluation["miou"]), "gflops": float(evaluation["gflops"]),
            "source": str(path), "image_matrices": _archived(path.parent / output_files.EVALUATE_IMAGES, key,
                                                             "rerun evaluate")}


def _recommended_matrices(path: Path, document: dict, name: str) -> np.ndarray:
    """The recommended set's per-image matrices, from the .npz that eval_scales.yaml names, checked
    to be the one written with it (a kill between the two writes leaves another run's)."""
    named = document.get("per_image") or {}
    if not named.get("file"):
        raise ValueError(f"{path} names no per-image evaluation (written by an older eval-scales): rerun "
                         "eval-scales")
    archive = path.parent / named["file"]
    if not archive.is_file() or hashlib.sha256(archive.read_bytes()).hexdigest() != named.get("sha256"):
        raise ValueError(f"{archive} is not the file {path} was written with (an interrupted eval-scales?): "
                         "rerun eval-scales")
    return _archived(archive, name, "rerun eval-scales")


def _archived(archive: Path, key: str, remedy: str) -> np.ndarray:
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: no per-image evaluation for the registry gate ({remedy})")
    with np.load(archive) as arrays:
        if key not in arrays.files:
            raise KeyError(f"{archive} has no per-image evaluation of {key} ({remedy})")
        return arrays[key]


def register(cfg: PipelineConfig) -> dict:
    import mlflow

    rc = cfg.register
    run = json.loads(Path(cfg.train.run_record).read_text())
    env = Environment.from_environ()
    _check_same_tracking_store(run, env.tracking_uri, cfg.train.run_record)
    served = served_evaluation(cfg)
    weights_sha = hashlib.sha256((Path(cfg.train.output) / WEIGHTS_FILE).read_bytes()).hexdigest()
    tracking.setup_experiment(env, cfg.mlflow.experiment)
    client = mlflow.MlflowClient()
    dataset = client.get_run(run["run_id"]).data.tags.get("dataset_manifest", "")
    champion = _champion(client, rc.model_name)
    _check_same_dataset(rc.model_name, champion, dataset)
    existing = [v for v in client.search_model_versions(f"name = '{rc.model_name}'")
                if v.tags.get("weights_sha256") == weights_sha and v.tags.get("eval_scales") == str(served["scales"])]
    created = not existing
    noise = None
    if champion is not None and not any(v.version == champion["version"] for v in existing):
        matrices = _champion_matrices(champion)
        if matrices is not None:
            noise = noise_bound(served["image_matrices"], matrices, rc.bootstrap_rounds)
    if existing:
        version = existing[0]
    else:
        tags = {"weights_sha256": weights_sha, "val_miou": str(served["miou"]), "gflops": str(served["gflops"]),
                "eval_scales": str(served["scales"]), "method": cfg.model.method,
                "train_scales": str(cfg.model.train_scales),
                "dataset_manifest": dataset,
                "gate_images": _log_matrices(client, run["run_id"], weights_sha, served),
                "git_commit": tracking.git_commit()}
        model_uri = _served_model(client, cfg, run["run_id"], served["scales"],
                                  {"weights_sha256": weights_sha, "eval_scales": str(served["scales"])})
        version = mlflow.register_model(model_uri, rc.model_name, tags=tags)
    try:
        candidate = {"version": version.version, "miou": served["miou"], "gflops": served["gflops"],
                     "scales": served["scales"]}
        promote, reason = decide(candidate, champion, rc.min_delta, rc.max_gflops, noise)
        if promote:
            if champion is not None:
                client.set_registered_model_alias(rc.model_name, "previous", champion["version"])
            client.set_registered_model_alias(rc.model_name, "champion", version.version)
            # A challenger lost to the champion that was just replaced; it names no contender now.
            if _version_by_alias(client, rc.model_name, "challenger") is not None:
                client.delete_registered_model_alias(rc.model_name, "challenger")
        elif not (champion and champion["version"] == version.version):
            client.set_registered_model_alias(rc.model_name, "challenger", version.version)
        key = scale_set_key(served["scales"], "_")
        with mlflow.start_run(run_id=run["run_id"]):
            # On the registered version's own logged model (the served one), not the trained one:
            # a model's page then shows its own figures, not those of the version logged before it.
            mlflow.log_metrics({f"val_miou_{key}": served["miou"], f"gflops_{key}": served["gflops"]},
                               model_id=_logged_model_id(version))
    except Exception:
        if created:  # leave no version behind that the gate never judged
            client.delete_model_version(rc.model_name, version.version)
        raise
    found = {a: _version_by_alias(client, rc.model_name, a) for a in ("champion", "challenger", "previous")}
    aliases = {a: v.version for a, v in found.items() if v is not None}
    return {"model_name": rc.model_name, "version": version.version, "created_version": created,
            "promoted": promote, "reason": reason, "candidate": candidate, "previous_champion": champion,
            "noise_bound": noise,
            "served_scales": served["scales"], "gate_source": served["source"],
            "aliases": aliases, "run_id": run["run_id"]}


def _log_matrices(client, run_id: str, weights_sha: str, served: dict) -> str:
    """The served set's per-image matrices as an artifact of the training run, at a path of these
    weights and this set (a rerun after a kill writes the same file again); returns that path."""
    folder = f"gate/{weights_sha[:16]}-{scale_set_key(served['scales'], '_')}"
    with tempfile.TemporaryDirectory(prefix="hmsa-gate-") as directory:
        local = Path(directory) / "val_image_matrices.npy"
        np.save(local, served["image_matrices"])
        client.log_artifact(run_id, str(local), artifact_path=folder)
    return f"{folder}/{local.name}"


def _served_model(client, cfg: PipelineConfig, run_id: str, scales: list[float], tags: dict[str, str]) -> str:
    """URI of the served model (the trained weights serving `scales`) logged to the training run,
    logged once: a rerun after a kill reuses the one that finished and deletes one left half-logged."""
    import mlflow

    experiment_id = client.get_run(run_id).info.experiment_id
    matching = " AND ".join(f"tags.{key} = '{value}'" for key, value in tags.items())
    for logged in client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = 'served' AND {matching}"):
        if logged.status.value == "READY":
            return logged.model_uri
        client.delete_logged_model(logged.model_id)  # a kill during its upload left it unfinished
    with mlflow.start_run(run_id=run_id):
        return tracking.log_saved_model(cfg.train.output, scales, name="served", tags=tags,
                                        max_request_pixels=cfg.register.max_request_pixels)


def _check_same_tracking_store(run: dict, tracking_uri: str, record: str) -> None:
    """The training run lives in the tracking store it was recorded in (train.run_record); after a
    move to another server, `train` stays cached while its run is not there."""
    recorded = run.get("tracking_uri")
    if recorded and recorded != redact(tracking_uri):
        raise ValueError(f"{record}: training run {run['run_id']} was tracked at {recorded}, but MLFLOW_TRACKING_URI "
                         f"is now {redact(tracking_uri)}: register it where it was trained (set MLFLOW_TRACKING_URI "
                         "back), or train it again on the new server (dvc repro --force train)")


def _check_same_dataset(name: str, champion: dict | None, dataset: str) -> None:
    """A registered model's versions are judged against each other, so they must come from one
    dataset: a champion of the synthetic set would judge a candidate of Cityscapes."""
    theirs = champion["dataset"] if champion is not None else ""
    if dataset and theirs and dataset != theirs:
        raise ValueError(f"register.model_name = {name}: its champion v{champion['version']} was trained on dataset "
                         f"{theirs[:12]}, this candidate on {dataset[:12]} (manifest hashes); their mIoU cannot be "
                         "compared: register this model under another register.model_name")


def _logged_model_id(version) -> str:
    """The logged model a registry version was made from: MLflow 3 names it in the version's source
    (`models:/<model id>`; the version's own model_id field stays empty for a registered URI)."""
    return version.model_id or version.source.removeprefix("models:/")


def _version_by_alias(client, name: str, alias: str):
    """The model version an alias points at, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def main(cfg: PipelineConfig) -> None:
    # Checked before the registry is touched: refused after it, the decision would be lost
    output_files.check_files([output_files.OutputFile("register.output", Path(cfg.register.output),
                                                      output_files.REGISTRATION)])
    decision = register(cfg)
    with atomic_file(cfg.register.output, output_files.REGISTRATION) as handle:
        json.dump(decision, handle, indent=2)
    verdict = "champion" if decision["promoted"] else "not promoted"
    print(f"{cfg.register.model_name} v{decision['version']} serving scales {decision['served_scales']}: "
          f"{verdict} ({decision['reason']}); aliases {decision['aliases']}")


if __name__ == "__main__":
    run_stage(main, __doc__)
