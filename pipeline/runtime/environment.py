"""Where the run happens: the cluster, the shared storage and the tracking server.

These are environment, not stage params (DESIGN section 6): pointing the same checkout at a
cluster, another bucket or another tracking server must not invalidate any DVC stage. They are
read once, at a stage's entry point, from the standard variables the libraries themselves know:

    RAY_ADDRESS                     a Ray cluster to join (unset: a local Ray)
    HMSA_STORAGE                    storage every node reaches: s3://bucket/prefix, or a path on a
                                    shared filesystem (unset: ./ray_results, this machine only)
    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL   an S3-compatible endpoint (SeaweedFS, MinIO)
    AWS_REGION / AWS_DEFAULT_REGION
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE   credentials
    MLFLOW_TRACKING_URI             an MLflow server (unset: sqlite:///mlflow.db, this machine only);
                                    user:password@ in it become MLFLOW_TRACKING_USERNAME/PASSWORD
                                    (pipeline.runtime.common.move_uri_credentials, at every stage's start)
    MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN   tracking credentials

One `Environment` builds every client of object storage: boto3 (through components.storage) where
we call S3 ourselves, a pyarrow filesystem where Ray needs one.

Credentials never travel with a job: Ray writes a job's runtime_env (its env_vars included) into its
logs and job table. A local Ray's processes inherit this process's environment; the nodes of a
cluster take their own (a Kubernetes Secret, an instance role: infra/kuberay), and the pre-flight
check names a node that has none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from components.storage import Storage, is_s3, join, split_s3, storage_for

# Where storage and tracking are, which a Ray worker on another node needs: shipped with the job's
# runtime_env. No secret among them (see the module docstring).
FORWARDED_VARIABLES = (
    "HMSA_STORAGE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
    "MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
)


LOCAL_CHECKPOINTS = "ray_results"
LOCAL_TRACKING = "sqlite:///mlflow.db"
DVC_EXPERIMENT_WORKSPACES = (".dvc", "tmp", "exps")  # where `dvc exp run --temp` and queued runs happen


def checkout_dir(directory: Path) -> Path:
    """The checkout a stage runs for. DVC runs `dvc exp run --temp` and queued experiments in a copy
    under <checkout>/.dvc/tmp/exps/ and deletes it afterwards: a relative local tracking store
    resolves against the checkout itself, so those experiments share its MLflow history."""
    parts, marker = directory.resolve().parts, DVC_EXPERIMENT_WORKSPACES
    for start in range(len(parts) - len(marker)):
        if parts[start:start + len(marker)] == marker:
            return Path(*parts[:start])
    return directory


@dataclass(frozen=True)
class Environment:
    ray_address: str | None
    storage_root: str | None  # s3://bucket/prefix or an absolute shared path; None: this machine only
    s3_endpoint: str | None
    s3_region: str | None
    tracking_uri: str  # always set: the embedded SQLite default is made absolute here

    @classmethod
    def from_environ(cls, environ: dict | None = None) -> Environment:
        env = os.environ if environ is None else environ
        root = env.get("HMSA_STORAGE") or None
        if root and not is_s3(root):
            root = str(Path(root).resolve())
        elif root:
            split_s3(root)  # names the variable's value when it has no bucket
        uri = env.get("MLFLOW_TRACKING_URI") or LOCAL_TRACKING
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = "sqlite:///" + str(checkout_dir(Path.cwd()).joinpath(uri[len("sqlite:///"):]).resolve())
        return cls(ray_address=env.get("RAY_ADDRESS") or None, storage_root=root,
                   s3_endpoint=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
                   s3_region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
                   tracking_uri=uri)

    # --- tracking -------------------------------------------------------------------------------
    @property
    def tracking_is_local(self) -> bool:
        """SQLite or a file store: only processes on this machine can write to it."""
        return not self.tracking_uri.startswith(("http://", "https://", "databricks"))

    def local_artifact_location(self) -> str | None:
        """Artifacts of a local store go next to its database file (no server to proxy them)."""
        if self.tracking_uri.startswith("sqlite:///"):
            return Path(self.tracking_uri[len("sqlite:///"):]).parent.joinpath("mlartifacts").as_uri()
        return None

    # --- storage --------------------------------------------------------------------------------
    def storage(self, uri: str, quick: bool = False) -> Storage:
        """Files at `uri` (local path or s3://) through this environment's endpoint and region."""
        return storage_for(uri, self.s3_endpoint, self.s3_region, quick=quick)

    def checkpoint_root(self) -> str:
        """Where Ray Train and Tune keep runs: in shared storage, else ./ray_results on this machine."""
        if self.storage_root:
            return join(self.storage_root, "ray")
        return str(Path(LOCAL_CHECKPOINTS).resolve())

    def pyramid_root(self) -> str | None:
        """Where pyramids are published by content hash for workers on other nodes (None: nowhere)."""
        return join(self.storage_root, "pyramids") if self.storage_root else None

    def ray_storage(self) -> tuple[str, object | None]:
        """(storage_path, storage_filesystem) for RunConfig: a pyarrow S3 filesystem carrying the
        endpoint and region, so S3-compatible servers work and pyarrow never guesses AWS."""
        root = self.checkpoint_root()
        if not is_s3(root):
            return root, None
        bucket, key = split_s3(root)
        return "/".join(filter(None, [bucket, key.strip("/")])), self.pyarrow_filesystem()

    def pyarrow_filesystem(self):
        from pyarrow import fs

        # Credentials are not passed: pyarrow takes them from the same environment (or profile) on
        # every node, so they are never pickled into a task.
        kwargs = {"region": self.s3_region or "us-east-1"}
        if self.s3_endpoint:
            kwargs["endpoint_override"] = self.s3_endpoint
            kwargs["scheme"] = "http" if self.s3_endpoint.startswith("http://") else "https"
        return fs.S3FileSystem(**kwargs)

    def worker_variables(self) -> dict[str, str]:
        """The variables of this process that workers on other nodes need: where storage and
        tracking are, never credentials (the nodes have their own)."""
        variables = {name: os.environ[name] for name in FORWARDED_VARIABLES if os.environ.get(name)}
        # As resolved here: a relative path would resolve against the worker's own directory.
        variables["MLFLOW_TRACKING_URI"] = self.tracking_uri
        if self.storage_root:
            variables["HMSA_STORAGE"] = self.storage_root
        return variables
