#!/bin/sh
# Stop exactly the cluster that start.sh recorded: its process groups and every process descended
# from them (job drivers included). Other Ray clusters on this machine are left alone; this never
# runs `ray stop`, which would kill every Ray process of the machine.
#   cluster/local/stop.sh [--state FILE]
set -eu
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" -m workflows.ops.local_cluster stop "$@"
