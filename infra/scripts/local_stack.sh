#!/usr/bin/env bash
# A local stack of real services on loopback, for trying the "cluster" configuration on one machine:
#   bash infra/scripts/local_stack.sh start   # Ray head, MLflow server (SQLite), SeaweedFS S3 gateway
#   bash infra/scripts/local_stack.sh stop
# Then export the variables it prints, and set in params.yaml e.g.
#   pyramid.output: s3://hmsa/pyramid   storage.s3_endpoint_url: http://127.0.0.1:8333
set -euo pipefail
cd "$(dirname "$0")/../.."
STATE=.local-stack
BIN=.venv/bin
case "${1:-}" in
  start)
    mkdir -p "$STATE/weed" "$STATE/mlflow"
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0   # keep Ray on loopback
    "$BIN/ray" start --head --port=6379 --node-ip-address=127.0.0.1 --include-dashboard=false --disable-usage-stats
    nohup "$BIN/mlflow" server --host 127.0.0.1 --port 5000 --backend-store-uri "sqlite:///$PWD/$STATE/mlflow/mlflow.db" \
      --artifacts-destination "$PWD/$STATE/mlflow/artifacts" > "$STATE/mlflow.log" 2>&1 &
    echo $! > "$STATE/mlflow.pid"
    key=${AWS_ACCESS_KEY_ID:-hmsa-local}; secret=${AWS_SECRET_ACCESS_KEY:-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')}
    printf '{"identities":[{"name":"local","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","Write","List","Tagging"]}]}' \
      "$key" "$secret" > "$STATE/s3.json"
    nohup "$BIN/weed" server -dir="$STATE/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3 -s3.port=8333 \
      -s3.config="$STATE/s3.json" -s3.port.iceberg=0 -s3.port.lance=0 > "$STATE/weed.log" 2>&1 &
    echo $! > "$STATE/weed.pid"
    echo "export RAY_ADDRESS=127.0.0.1:6379 RAY_AUTH_MODE=token RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
    echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000"
    echo "export AWS_ACCESS_KEY_ID=$key AWS_SECRET_ACCESS_KEY=$secret AWS_DEFAULT_REGION=us-east-1"
    ;;
  stop)
    "$BIN/ray" stop || true
    for name in mlflow weed; do
      [ -f "$STATE/$name.pid" ] && kill "$(cat "$STATE/$name.pid")" 2>/dev/null || true
      rm -f "$STATE/$name.pid"
    done
    ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
