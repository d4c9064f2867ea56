#!/usr/bin/env bash
# The whole pipeline as one Ray job on a cluster (KubeRay RayJob entrypoint, `ray job submit`):
# inputs from the DVC remote, `dvc repro`, cached outputs back to the remote, the small results
# and dvc.lock to HMSA_STORAGE/results/<commit>/. Runs in the repository (the image's copy, or the
# job's working_dir). Needs the cluster environment: HMSA_STORAGE, MLFLOW_TRACKING_URI and the
# AWS_* variables (the DVC remote reads the same ones); arguments go to `dvc repro` (e.g. a stage).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${HMSA_STORAGE:?set HMSA_STORAGE=s3://bucket/prefix (shared storage of the cluster)}"
: "${MLFLOW_TRACKING_URI:?set MLFLOW_TRACKING_URI to the MLflow server}"
# The DVC remote of this cluster (.dvc/config names the local stack's bucket): a setting of this
# checkout only (--local), so the repository's own stays as it is.
if [ -n "${DVC_REMOTE_URL:-}" ]; then dvc remote modify --local storage url "$DVC_REMOTE_URL"; fi
dvc pull --allow-missing     # what an earlier run pushed; nothing on a first run
dvc repro "$@"
dvc push
python -m pipeline.save_results
