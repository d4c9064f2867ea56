"""Stage `register`: the trained model into the MLflow registry, promoted only when it is better.

The served scale set is register.scale_set: by default the inference-scale search's recommendation
(eval_scales.recommendation, written by the eval-scales stage), else an explicit set among evaluate.scale_sets. The
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
from pathlib import Path

from components.atomic import atomic_file
from components.config import PipelineConfig
from components.gate import decide, noise_bound
from components.models.saved import WEIGHTS_FILE
from components.redact import redact
from components.scales import scale_set_key
from pipeline.runtime import output_files, registry, tracking
from pipeline.runtime.common import run_stage
from pipeline.runtime.environment import Environment
from pipeline.runtime.served_evaluation import served_evaluation


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
    champion = registry.champion(client, rc.model_name)
    _check_same_dataset(rc.model_name, champion, dataset)
    existing = [v for v in client.search_model_versions(f"name = '{rc.model_name}'")
                if v.tags.get("weights_sha256") == weights_sha and v.tags.get("eval_scales") == str(served["scales"])]
    created = not existing
    noise = None
    if champion is not None and not any(v.version == champion["version"] for v in existing):
        matrices = registry.champion_matrices(champion)
        if matrices is not None:
            noise = noise_bound(served["image_matrices"], matrices, rc.bootstrap_rounds)
    if existing:
        version = existing[0]
    else:
        tags = {"weights_sha256": weights_sha, "val_miou": str(served["miou"]), "gflops": str(served["gflops"]),
                "eval_scales": str(served["scales"]), "method": cfg.model.method,
                "train_scales": str(cfg.model.train_scales),
                "dataset_manifest": dataset,
                "gate_images": registry.log_matrices(client, run["run_id"], weights_sha, served),
                "git_commit": tracking.git_commit()}
        model_uri = registry.served_model(client, cfg, run["run_id"], served["scales"],
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
            if registry.version_by_alias(client, rc.model_name, "challenger") is not None:
                client.delete_registered_model_alias(rc.model_name, "challenger")
        elif not (champion and champion["version"] == version.version):
            client.set_registered_model_alias(rc.model_name, "challenger", version.version)
        key = scale_set_key(served["scales"], "_")
        with mlflow.start_run(run_id=run["run_id"]):
            # On the registered version's own logged model (the served one), not the trained one:
            # a model's page then shows its own figures, not those of the version logged before it.
            mlflow.log_metrics({f"val_miou_{key}": served["miou"], f"gflops_{key}": served["gflops"]},
                               model_id=registry.logged_model_id(version))
    except Exception:
        if created:  # leave no version behind that the gate never judged
            client.delete_model_version(rc.model_name, version.version)
        raise
    found = {a: registry.version_by_alias(client, rc.model_name, a) for a in ("champion", "challenger", "previous")}
    aliases = {a: v.version for a, v in found.items() if v is not None}
    return {"model_name": rc.model_name, "version": version.version, "created_version": created,
            "promoted": promote, "reason": reason, "candidate": candidate, "previous_champion": champion,
            "noise_bound": noise,
            "served_scales": served["scales"], "gate_source": served["source"],
            "aliases": aliases, "run_id": run["run_id"]}


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
