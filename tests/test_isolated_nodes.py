"""A cluster whose worker nodes cannot see the driver's disk: the whole DAG, then a warm-start retrain.

The head runs in this process's mount namespace with no CPUs (as cluster/kuberay's), so every task
and actor that does work runs on the worker node. That one runs in a mount namespace of its own
(`unshare -m`) in which the driver's registry, runs folder, model cache, HOME and temp folders are
empty tmpfs mounts: any path the driver hands a worker fails there. The training data and the work
directory are on the local S3 server, as they would be on a real cluster; the eval data is a file on
the driver's disk, so its read tasks must stay on the driver's node.

The retrain warm-starts from the champion and evaluates against it: both adapters must reach the
train workers and the eval actors as bytes, never as the registry's paths on the driver's disk.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_pipeline_e2e import make_row

from workflows.artifacts import cache_root
from workflows.ops.local_cluster import start_head
from workflows.registry.sqlite import Registry

pytestmark = pytest.mark.train_group

REPO = Path(__file__).resolve().parents[1]


def rows(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return "".join(json.dumps(make_row(rng)) + "\n" for _ in range(n)).encode()


def in_own_mount_namespace(hidden: list[Path]) -> list[str]:
    """A command prefix: a new mount namespace with an empty tmpfs over each of `hidden`, then exec."""
    mounts = " && ".join(f"mount -t tmpfs tmpfs {p}" for p in hidden)
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh"]


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("isolated")
    wanted = {root, cache_root(), Path(os.environ["HOME"]), tmp_path_factory.getbasetemp()}
    for p in wanted:
        p.mkdir(parents=True, exist_ok=True)
    hidden = sorted(p for p in wanted if not any(q in p.parents for q in wanted))  # outermost folders
    head = start_head(num_cpus=0)
    try:
        head.add_worker(num_cpus=3, prefix=in_own_mount_namespace(hidden))
        yield root, head
    finally:
        head.stop()


def loraflow(*args: str, head, cwd: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "workflows.cli", *args, "--json", "--address", head.gcs_address],
                          cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout)


def test_the_dag_and_a_warm_start_retrain_run_on_nodes_that_cannot_see_the_driver(cluster, s3):
    root, head = cluster
    s3.put("isolated/data/rows.jsonl", rows(96, seed=0))
    (root / "eval.jsonl").write_bytes(rows(24, seed=2))
    config = root / "pipeline.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "tiny-llama"},
        "data": {"source": s3.uri("isolated/data/rows.jsonl"), "eval_source": str(root / "eval.jsonl"),
                 "format": "instruction", "max_seq_len": 128},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"num_workers": 2, "cpus_per_worker": 0.5, "batch_size": 4, "lr": 1e-2, "max_steps": 4,
                  "log_every": 4, "checkpoint_every": 4, "eval_batches": 1},
        "eval": {"batch_size": 16, "bootstrap_samples": 0},
        "registry": {"root": str(root / "registry"), "name": "iso", "gate": {"metric": "loss"}},
        "cluster": {"work_dir": s3.uri("isolated/work"), "runs_dir": str(root / "runs")}}))

    first = loraflow("run", str(config), head=head, cwd=root)
    assert [first["stages"][s]["status"] for s in ("prepare", "train", "evaluate", "register")] == ["ran"] * 4
    assert first["stages"]["register"]["outputs"]["decision"]["promote"], first["stages"]["register"]["outputs"]

    s3.put("isolated/data/rows.jsonl", rows(112, seed=1))  # new data: the scheduler's next tick retrains
    out = loraflow("retrain", str(config), "--warm-start", head=head, cwd=root)
    assert out["status"] in ("promoted", "kept-champion") and out["champion_before"] == "iso:1"
    registry = Registry(root / "registry")
    second = registry.get("iso:2")
    assert second.lineage["parent_adapter"] == "iso:1"  # trained from the champion's bytes
    evaluated = registry.decisions("iso", 2)[0]["numbers"]
    assert evaluated["compared_with"] == "champion" and evaluated["champion_ref"] == "iso:1"
