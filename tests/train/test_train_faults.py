"""Fault tolerance: a worker SIGKILLed mid-run, and a simulated node lost from a 3-node cluster
whose head has no CPUs, as cluster/kuberay's (the data is prepared in that cluster too).

Both wait until Ray Train has *registered* a checkpoint (it is in checkpoint_manager_snapshot.json;
a checkpoint directory merely uploaded is not enough) and then kill, so the run must resume from
that checkpoint or a later one: at most one checkpoint interval of work is lost.

The SIGKILL run also compresses its gradients to bf16 (`test_bf16_...` reads its metrics): one
TorchTrainer start-up serves both checks, and the compression hook is proven to survive a restart.

The multi-node case needs its own Ray cluster (`ray.cluster_utils.Cluster`), so it runs this file
as a script in a subprocess: the session's Ray belongs to the test process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.train_group

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "train")]

from train_support import gsm8k_config, prepared_gsm8k, read_jsonl  # noqa: E402

from workflows.train.stage import run_train  # noqa: E402

# Steps of 2 rows per worker are cheap (~0.3 s here); 16 of them leave 12 after the first registered
# checkpoint (step 4), plenty of run left for the kill to land mid-run.
FAULT_TRAIN = {"max_steps": 16, "batch_size": 2, "grad_accum": 1, "checkpoint_every": 4, "log_every": 2,
               "eval_every": None, "eval_batches": 1, "max_failures": 1}


def registered_step(run_dir: Path) -> int | None:
    """Step of the latest checkpoint Ray Train has registered for this run, if any."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or mid-write
        return None
    return latest["metrics"]["step"] if latest else None


def train_worker_pids(root: psutil.Process) -> list[int]:
    pids = []
    for proc in root.children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return pids


def wait_for_registered_checkpoint(run_dir: Path, thread: threading.Thread, timeout_s: float = 600) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and thread.is_alive():
        step = registered_step(run_dir)
        if step is not None:
            return step
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint registered in {run_dir} (run thread alive: {thread.is_alive()})")


def last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return max((r["step"] for r in read_jsonl(path)), default=0) if path.is_file() else 0


def train_in_thread(config, prepared, work: Path, run_name: str) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = run_train(config, prepared, work / "stage", storage_path=work / "ray_train",
                                          run_name=run_name)
        except BaseException as e:  # surfaced by the test after join()
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


@pytest.fixture(scope="module")
def sigkilled(ray_session, example_data, session_tmp, tmp_path_factory):
    """A bf16-compressed run whose second train worker is SIGKILLed after a registered checkpoint."""
    prepared = prepared_gsm8k(example_data, session_tmp)
    work = tmp_path_factory.mktemp("sigkill")
    config = gsm8k_config(example_data, **FAULT_TRAIN, grad_compression="bf16")
    me = psutil.Process()
    before = set(train_worker_pids(me))
    thread, outcome = train_in_thread(config, prepared, work, "sigkill-a0")
    run_dir = work / "ray_train" / "sigkill-a0"

    checkpoint_step = wait_for_registered_checkpoint(run_dir, thread)
    logged = last_logged_step(run_dir)
    victims = [pid for pid in train_worker_pids(me) if pid not in before]
    if victims:
        os.kill(victims[-1], signal.SIGKILL)
    thread.join(timeout=600)
    return {"victims": victims, "checkpoint_step": checkpoint_step, "logged": logged, **outcome}


def test_a_sigkilled_worker_is_replaced_and_resumes_from_the_registered_checkpoint(sigkilled):
    assert len(sigkilled["victims"]) == 2, sigkilled["victims"]
    assert "error" not in sigkilled, sigkilled.get("error")
    m = sigkilled["result"].metrics
    assert m["steps"] == FAULT_TRAIN["max_steps"]
    # Restarted from the checkpoint registered before the kill (or a later one), never from scratch:
    assert m["resumed_from_step"] >= sigkilled["checkpoint_step"] > 0
    # ... so the work lost is under one checkpoint interval of what had been done at the kill.
    assert sigkilled["logged"] - m["resumed_from_step"] <= FAULT_TRAIN["checkpoint_every"]


def test_bf16_gradient_compression_halves_the_allreduced_bytes(sigkilled):
    """Counted on the compressed tensor, every step of the restarted worker group (a fresh hook)."""
    assert "error" not in sigkilled, sigkilled.get("error")
    m = sigkilled["result"].metrics
    assert m["resumed_from_step"] > 0  # these bytes were counted after the restart
    assert m["allreduce_bytes_per_step_distinct"] == [m["adapter_param_bytes"] // 2]
    assert m["allreduce_bytes_per_step"] * 2 == m["adapter_param_bytes"]


def test_losing_the_node_of_a_worker_restarts_the_group_on_another_node(
        ray_session, example_data, session_tmp, tmp_path):
    prepared = prepared_gsm8k(example_data, session_tmp)  # prepared once, in the session's cluster
    out = tmp_path / "outcome.json"
    proc = subprocess.run([sys.executable, __file__, str(tmp_path), str(out)],
                          capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests' / 'train'}"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    outcome = json.loads(out.read_text())

    # prepare ran on the CPU-less head's cluster (its writes are pinned to the driver's node, the head)
    # and gave the very rows the session's cluster gave
    assert outcome["rows_digest"] == prepared.manifest["rows_digest"]
    assert outcome["removed_node_had_worker"]
    assert outcome["nodes_alive_after"] == 3  # the head and the two remaining workers' nodes
    assert outcome["metrics"]["steps"] == FAULT_TRAIN["max_steps"]
    assert outcome["metrics"]["resumed_from_step"] >= outcome["checkpoint_step"] > 0


def _multinode_main(work: Path, out: Path) -> None:
    """A head without CPUs (as cluster/kuberay's) and three 1-CPU nodes: prepare the data there, then
    train and remove the node of a train worker mid-run."""
    import ray
    from ray.cluster_utils import Cluster

    from workflows.prepare.stage import run_prepare

    example_data = REPO / "data"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        prepared = run_prepare(gsm8k_config(example_data), work / "prepared")
        # Half a CPU per worker leaves a CPU free after the loss: Ray must re-run the read task of
        # the data blocks that lived in the lost node's object store, and that task needs a CPU.
        config = gsm8k_config(example_data, **FAULT_TRAIN, cpus_per_worker=0.5)
        thread, outcome = train_in_thread(config, prepared, work, "multinode-a0")
        checkpoint_step = wait_for_registered_checkpoint(work / "ray_train" / "multinode-a0", thread)
        raylets = {n: psutil.Process(n.all_processes["raylet"][0].process.pid) for n in nodes}
        victim = next((n for n in nodes if train_worker_pids(raylets[n])), None)
        if victim is not None:
            cluster.remove_node(victim, allow_graceful=False)
        thread.join(timeout=600)
        if "error" in outcome:
            raise outcome["error"]
        out.write_text(json.dumps({
            "rows_digest": prepared.manifest["rows_digest"], "removed_node_had_worker": victim is not None,
            "checkpoint_step": checkpoint_step,
            "nodes_alive_after": sum(1 for n in ray.nodes() if n["Alive"]),
            "metrics": outcome["result"].metrics}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    _multinode_main(Path(sys.argv[1]), Path(sys.argv[2]))
