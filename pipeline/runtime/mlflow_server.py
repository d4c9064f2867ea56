"""How every MLflow tracking server of this project is started: the variables its process gets.

MLflow 3's server starts, beside itself, a job runner and a pool of huey consumer processes for its
own server-side jobs (GenAI judges, trace roll-ups). The pipeline submits none of them, and the
processes are not free (each imports MLflow): measured on a 2-core machine, a server's start and
first 30 s took 22 CPU-s with them and 6 without; in the test suite they took about 180 CPU-s (nine
server starts). So the local stack, the Kubernetes Deployment
(infra/kuberay/mlflow.yaml, checked by tests/test_infra.py) and the tests' servers turn them off.
Standard library only, so infra/local/stack.py can use it.
"""

from __future__ import annotations

MLFLOW_SERVER_VARIABLES = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
