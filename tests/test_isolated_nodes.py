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
from test_pipeline_e2e import make_row, statuses

from workflows.artifacts import SUCCESS, cache_root
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


@pytest.fixture(scope="module")
def first(cluster, s3):
    """The whole DAG once on the isolated node, every S3 write it makes recorded."""
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
                  "log_every": 4, "checkpoint_every": 2, "eval_batches": 1},
        "eval": {"batch_size": 16, "bootstrap_samples": 0},
        "registry": {"root": str(root / "registry"), "name": "iso", "gate": {"metric": "loss"}},
        "cluster": {"work_dir": s3.uri("isolated/work"), "runs_dir": str(root / "runs")}}))
    s3.record("reset-recording")
    s3.record("start-recording")
    try:
        manifest = loraflow("run", str(config), head=head, cwd=root)
    finally:
        s3.record("stop-recording")
    run_name = manifest["stages"]["train"]["outputs"]["run_name"]
    metrics_writes = [(method, query) for method, key, query in s3.recorded_writes()
                      if key == f"isolated/work/ray_train/{run_name}/metrics.jsonl"]
    return {"root": root, "head": head, "config": config, "manifest": manifest, "metrics_writes": metrics_writes}


def test_the_dag_runs_on_nodes_that_cannot_see_the_driver(first):
    assert statuses(first["manifest"]) == ["ran"] * 4
    register = first["manifest"]["stages"]["register"]["outputs"]
    assert register["decision"]["promote"], register


# --- the work directory in the bucket (an object store is what nodes that share no disk share) ----

def test_every_stage_output_is_committed_in_the_bucket(first, s3):
    manifest = first["manifest"]
    for stage, must_hold in (("prepare", "manifest.json"), ("train", "adapter/adapter_config.json"),
                             ("evaluate", "metrics.json"), ("register", "register.json")):
        out = manifest["stages"][stage]["outputs"]["dir"]
        fp = manifest["stages"][stage]["fingerprint"]
        assert out == s3.uri(f"isolated/work/{stage}/{fp}")  # the run manifest records the store URIs
        keys = s3.keys(f"isolated/work/{stage}/{fp}")
        assert f"isolated/work/{stage}/{fp}/{SUCCESS}" in keys and f"isolated/work/{stage}/{fp}/{must_hold}" in keys


def test_ray_train_checkpoints_live_under_the_work_dir_in_the_bucket(first, s3):
    run_name = first["manifest"]["stages"]["train"]["outputs"]["run_name"]
    keys = s3.keys(f"isolated/work/ray_train/{run_name}")
    assert any("/checkpoint_" in k for k in keys)
    assert f"isolated/work/ray_train/{run_name}/checkpoint_manager_snapshot.json" in keys
    assert f"isolated/work/ray_train/{run_name}/final/adapter/adapter_model.safetensors" in keys


def test_rank_0_publishes_the_metrics_log_at_every_checkpoint_not_only_at_the_end(first):
    uploads = [q for method, q in first["metrics_writes"] if (method, q) == ("POST", "uploads")  # multipart
               or method == "PUT" and "partNumber=" not in q]                                    # single PUT
    assert len(uploads) == 3  # 4 steps: after the checkpoints at steps 2 and 4, and when rank 0 stopped


def test_the_run_registered_a_version_in_the_drivers_registry(first):
    root, manifest = first["root"], first["manifest"]
    reg = manifest["stages"]["register"]["outputs"]
    assert reg["version"] == 1 and reg["decision"]["promote"] is True
    assert (root / "registry" / "adapters" / "iso" / "1" / "adapter_config.json").is_file()
    assert (root / "runs" / manifest["run_id"] / "loss.png").is_file()  # the report read metrics from the bucket


def test_second_run_is_all_cache_hits_without_starting_ray(first):
    manifest = loraflow("run", str(first["config"]), head=first["head"], cwd=first["root"])
    assert statuses(manifest) == ["hit"] * 4
    assert manifest["ray_started"] is False


def test_dag_reports_the_bucket_cache_status(first):
    proc = subprocess.run([sys.executable, "-m", "workflows.cli", "dag", str(first["config"]), "--json",
                           "--set", "train.lr=1e-3"], cwd=first["root"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["stage"]: r for r in json.loads(proc.stdout)}
    assert rows["prepare"]["status"] == "hit" and rows["train"]["status"] == "miss"


def test_a_warm_start_retrain_gets_the_champion_as_bytes_on_the_isolated_node(first, s3):
    """Last in this module: it changes the data."""
    root = first["root"]
    s3.put("isolated/data/rows.jsonl", rows(112, seed=1))  # new data: the scheduler's next tick retrains
    out = loraflow("retrain", str(first["config"]), "--warm-start", head=first["head"], cwd=root)
    assert out["status"] in ("promoted", "kept-champion") and out["champion_before"] == "iso:1"
    registry = Registry(root / "registry")
    second = registry.get("iso:2")
    assert second.lineage["parent_adapter"] == "iso:1"  # trained from the champion's bytes
    evaluated = registry.decisions("iso", 2)[0]["numbers"]
    assert evaluated["compared_with"] == "champion" and evaluated["champion_ref"] == "iso:1"
