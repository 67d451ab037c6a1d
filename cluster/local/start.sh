#!/bin/sh
# Start a private Ray head on this machine (plus --workers N extra worker nodes), on free ports,
# dashboard and job API on 127.0.0.1, token auth on. Records its processes for stop.sh.
#   cluster/local/start.sh [--workers N] [--num-cpus N] [--dashboard-host 0.0.0.0] [--auth-mode token|disabled]
# The state file is $LORAFLOW_LOCAL_STATE (default ~/.local/state/loraflow/local-cluster.json) or --state FILE.
set -eu
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" -m workflows.ops.local_cluster start "$@"
