#!/bin/sh
# Print the recorded cluster (addresses, pids, temp dir) and how many of its processes are alive.
# Exit 0 while its head runs, 1 otherwise.
#   cluster/local/status.sh [--state FILE]
set -eu
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" -m workflows.ops.local_cluster status "$@"
