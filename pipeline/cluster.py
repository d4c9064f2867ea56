"""Connecting to Ray and checking, before training starts, that the run can actually be placed.

Each check fails fast with a message that names the params key to change, instead of letting a
trainer wait forever for resources the cluster does not have.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from pathlib import Path

from components.config import PipelineConfig, RayConfig
from components.storage import is_s3


class ClusterError(RuntimeError):
    """The Ray cluster or storage cannot run this configuration; the message says what to change."""


def _check_reachable(address: str) -> None:
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            return
    except (OSError, ValueError) as err:
        raise ClusterError(
            f"ray.address = {address!r}: no Ray cluster answers there ({err}). Start one with `ray start "
            "--head`, fix the address, or set ray.address to null (and unset RAY_ADDRESS) for a local Ray."
        ) from None


def connect(cfg: RayConfig) -> str:
    """Join the configured cluster, or start a local Ray; returns a description for the log."""
    import ray

    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return "the Ray instance already running in this process"
    if address:
        _check_reachable(address)
        ray.init(address=address, log_to_driver=True)
        return f"the Ray cluster at {address}"
    # A local instance listens on loopback only: nothing outside this machine needs to reach it.
    ray.init(_node_ip_address="127.0.0.1")
    return "a local Ray instance"


def decide_gpu(cfg: RayConfig) -> bool:
    """Whether workers use GPUs; raises when the request cannot be placed on this cluster."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    use_gpu = gpus > 0 if cfg.use_gpu == "auto" else cfg.use_gpu
    if use_gpu and gpus == 0:
        raise ClusterError("ray.use_gpu = true, but the cluster has no GPU: set ray.use_gpu to auto or false")
    need_cpu = cfg.num_workers * cfg.cpus_per_worker
    if need_cpu > cpus:
        raise ClusterError(
            f"ray.num_workers = {cfg.num_workers} x ray.cpus_per_worker = {cfg.cpus_per_worker} needs "
            f"{need_cpu:g} CPUs, but the cluster has {cpus:g}: lower ray.num_workers or ray.cpus_per_worker"
        )
    if use_gpu and cfg.num_workers * cfg.gpus_per_worker > gpus:
        raise ClusterError(
            f"ray.num_workers = {cfg.num_workers} x ray.gpus_per_worker = {cfg.gpus_per_worker} needs "
            f"{cfg.num_workers * cfg.gpus_per_worker:g} GPUs, but the cluster has {gpus:g}: lower ray.num_workers"
        )
    return use_gpu


def check_storage(storage_path: str) -> str:
    """Make sure checkpoints can be written there; returns the path Ray should use (absolute)."""
    if is_s3(storage_path):
        return storage_path
    path = Path(storage_path).resolve()
    probe = path / f".write-test-{uuid.uuid4().hex}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ClusterError(f"ray.storage_path = {storage_path!r}: cannot write there ({err.strerror}); "
                           "choose a writable directory or an s3:// URI") from None
    return str(path)


def run_key(cfg: PipelineConfig, dataset_fingerprint: str) -> str:
    """A stable id for 'this training': same config and data, same run (so a restart resumes it)."""
    relevant = {"model": cfg.model.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json"),
                "loader": cfg.loader.model_dump(mode="json"), "data": dataset_fingerprint,
                "workers": cfg.ray.num_workers}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


def absolute_paths(params: dict) -> dict:
    """A copy of the params with local paths made absolute, for workers in other directories."""
    out = json.loads(json.dumps(params))
    for section, key in (("pyramid", "output"), ("prepare", "output"), ("ray", "storage_path")):
        value = out[section][key]
        if not is_s3(value):
            out[section][key] = str(Path(value).resolve())
    return out
