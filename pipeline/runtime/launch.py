"""The one place where `train` and `tune` decide where and how a Ray run happens.

Order matters: services are checked before Ray starts (a dead tracking server or wrong S3
credentials fail in seconds, not after Ray has started and retried), then Ray is joined, the
data is placed where every node can read it, and every node runs a pre-flight check.
"""

from __future__ import annotations

from dataclasses import dataclass

from components.config import ConfigError, PipelineConfig
from pipeline.runtime import capacity, cluster, leftovers, ray_session
from pipeline.runtime.environment import Environment


@dataclass(frozen=True)
class Launch:
    env: Environment
    where: str  # for the log
    use_gpu: bool
    remote: bool  # workers may run on another node than the driver
    pyramid_uri: str  # what workers read: a local directory, or its published copy
    checkpoint_root: str

    def run_storage(self) -> tuple[str, object | None]:
        """(storage_path, storage_filesystem) for Ray Train and Tune RunConfigs."""
        return self.env.ray_storage()

    def loop_settings(self) -> dict:
        """What every worker needs besides the config (no secrets: those travel as variables)."""
        return {"pyramid_uri": self.pyramid_uri, "mlflow_uri": self.env.tracking_uri}


def check_classes(num_classes: int, pyramid: str, key: str = "model.num_classes") -> None:
    """The model's class count against the dataset's manifest, before any worker starts (a mismatch
    would otherwise fail inside every worker, once per retry)."""
    from components.data.pyramid import PyramidReader

    dataset = PyramidReader(pyramid).num_classes
    if num_classes != dataset:
        raise ConfigError(f"{key} = {num_classes}, but the dataset at {pyramid} has {dataset} classes "
                          f"(its manifest.json): set {key} to {dataset}")


def check_full_batches(cfg: PipelineConfig, pyramid: str) -> None:
    """Every training worker gets at least one full batch of its share of the training split.
    Batches are whole (drop_last), so a batch larger than a worker's share trained nothing: the run
    ended at once, saved its initial weights and was recorded as done."""
    from components.data.pyramid import PyramidReader

    images = len(PyramidReader(pyramid).entries("train"))
    workers = cfg.ray.worker_range[1]  # the most workers: the smallest share
    share = -(-images // workers)
    if cfg.train.batch_size > share:
        fewer = " or use fewer workers" if workers > 1 else ""
        raise ConfigError(f"train.batch_size = {cfg.train.batch_size}, but each of {workers} worker(s) "
                          f"(ray.num_workers) gets {share} of the {images} training images at {pyramid}: "
                          f"not one full batch; set train.batch_size to at most {share}{fewer}")


def prepare_launch(cfg: PipelineConfig, env: Environment | None = None, trains: bool = True) -> Launch:
    """`trains`: the run trains (train, tune, ablation), so its batches are checked against the data
    and a local Ray gets what Ray Train needs (ray_session.connect)."""
    check_classes(cfg.model.num_classes, cfg.pyramid.output)
    if trains:
        check_full_batches(cfg, cfg.pyramid.output)
    env = env or Environment.from_environ()
    cluster.check_tracking(env)
    checkpoint_root = cluster.check_storage(env)
    where = ray_session.connect(env, trains)
    use_gpu = capacity.provide(cfg.ray, cfg.ray.scale_up_timeout_s)
    remote = cluster.workers_may_be_remote()
    if remote:
        cluster.check_remote_requirements(env)
    pyramid_uri = cluster.place_pyramid(env, cfg.pyramid.output, remote)
    if env.ray_address:
        _free_leftovers()
        nodes = cluster.preflight(pyramid_uri, checkpoint_root, env.tracking_uri)
        print(f"pre-flight passed on {nodes} node(s): pyramid readable, storage writable, tracking reachable")
    return Launch(env=env, where=where, use_gpu=use_gpu, remote=remote, pyramid_uri=pyramid_uri,
                  checkpoint_root=checkpoint_root)


def _free_leftovers() -> None:
    """A joined cluster may still hold resources for runs that were killed or stopped (see
    `pipeline.runtime.leftovers`); a fresh local instance has none. Best effort: the stage goes on either
    way, and says what it did."""
    try:
        groups, requests = leftovers.free_leftovers()
    except Exception as err:  # noqa: BLE001  (the GCS may be briefly unreachable)
        print(f"could not look for leftovers of ended runs: {err}")
    else:
        if groups or requests:
            print(leftovers.describe(groups, requests))
