"""Fault tolerance on a cluster of three 1-CPU nodes and a head without CPUs, as cluster/kuberay's
(the data is prepared in that cluster too): the node of a train worker is removed mid-run.

The fault waits until Ray Train has *registered* a checkpoint (it is in
checkpoint_manager_snapshot.json; a checkpoint directory merely uploaded is not enough) and then
strikes, so the restart must resume from that checkpoint or a later one.

The run also compresses its gradients to bf16 (`test_bf16_...` reads its metrics): one run serves
both tests, and the compression hook is proven to survive a restart. A SIGKILLed worker is the
fault of the fp16 run in test_train_precision_moe.py (a Train run of its own here cost ~1 min).

The run needs its own Ray cluster (`ray.cluster_utils.Cluster`), so it runs this file as a script in
a subprocess: the session's Ray belongs to the test process.
"""

from __future__ import annotations

import json
import os
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

from train_support import gsm8k_config, prepared_gsm8k  # noqa: E402

from workflows.train.stage import run_train  # noqa: E402

# Steps of 2 rows per worker are cheap (~0.3 s here); 16 of them leave 12 after the first registered
# checkpoint (step 4), plenty of run left for the fault to land mid-run.
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


def wait_for(what: str, probe, thread: threading.Thread, timeout_s: float = 600):
    """`probe()`'s first result that is not None, polled while the run's thread lives."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and thread.is_alive():
        found = probe()
        if found is not None:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{what}: not seen (run thread alive: {thread.is_alive()})")


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
def faults(ray_session, example_data, session_tmp, tmp_path_factory):
    """What the faulted run in its own cluster saw, and the session's prepared rows to compare with."""
    prepared = prepared_gsm8k(example_data, session_tmp)  # prepared once, in the session's cluster
    work = tmp_path_factory.mktemp("faults")
    out = work / "outcome.json"
    proc = subprocess.run([sys.executable, __file__, str(work), str(out)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests' / 'train'}"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {**json.loads(out.read_text()), "session_rows_digest": prepared.manifest["rows_digest"]}


def test_losing_the_node_of_a_worker_restarts_the_group_on_another_node(faults):
    # prepare ran on the CPU-less head's cluster (its writes are pinned to the driver's node, the head)
    # and gave the very rows the session's cluster gave
    assert faults["rows_digest"] == faults["session_rows_digest"]
    lost = faults["node_loss"]
    assert lost["removed_node_had_worker"]
    assert lost["nodes_alive_after"] == 3  # the head and the two remaining workers' nodes
    m = faults["metrics"]
    assert m["steps"] == FAULT_TRAIN["max_steps"]
    assert m["resumed_from_step"] >= lost["checkpoint_step"] > 0  # from the registered checkpoint or a later one


def test_bf16_gradient_compression_halves_the_allreduced_bytes(faults):
    """Counted on the compressed tensor, every step of the restarted worker group (a fresh hook)."""
    m = faults["metrics"]
    assert m["resumed_from_step"] > 0  # these bytes were counted after the restart
    assert m["allreduce_bytes_per_step_distinct"] == [m["adapter_param_bytes"] // 2]
    assert m["allreduce_bytes_per_step"] * 2 == m["adapter_param_bytes"]


def _faults_main(work: Path, out: Path) -> None:
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
        ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        prepared = run_prepare(gsm8k_config(example_data), work / "prepared")
        # Half a CPU per worker leaves a CPU free after the loss: Ray must re-run the read task of
        # the data blocks that lived in the lost node's object store, and that task needs a CPU.
        config = gsm8k_config(example_data, **FAULT_TRAIN, cpus_per_worker=0.5, grad_compression="bf16")
        run_dir = work / "ray_train" / "multinode-a0"
        thread, outcome = train_in_thread(config, prepared, work, "multinode-a0")
        lost = {"checkpoint_step": wait_for("a registered checkpoint", lambda: registered_step(run_dir), thread)}
        raylets = {n: psutil.Process(n.all_processes["raylet"][0].process.pid) for n in nodes}
        victim = next((n for n in nodes if train_worker_pids(raylets[n])), None)
        lost["removed_node_had_worker"] = victim is not None
        if victim is not None:
            cluster.remove_node(victim, allow_graceful=False)
        thread.join(timeout=600)
        if "error" in outcome:
            raise outcome["error"]
        lost["nodes_alive_after"] = sum(1 for n in ray.nodes() if n["Alive"])
        out.write_text(json.dumps({"rows_digest": prepared.manifest["rows_digest"], "node_loss": lost,
                                   "metrics": outcome["result"].metrics}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    _faults_main(Path(sys.argv[1]), Path(sys.argv[2]))
