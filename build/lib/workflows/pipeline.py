"""Execute a plan: take the work directory's lock, run each missing stage in order, reuse each hit,
record the run.

Each body gets the outputs of its declared upstream stages only (`workflows.dag.STAGES`). Ray is
started only when a stage that needs it has to run, so a fully cached re-run never starts a
cluster. Every run writes `runs/<run-id>/manifest.json` (fingerprints, inputs, outputs, timings,
registry version) and a report. With the work directory on an object store each stage runs into a
local staging directory that is then published (`workflows.storage`); the manifest records the
store URIs of the outputs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from workflows import __version__, tracking
from workflows.adapters import AdapterFiles
from workflows.artifacts import atomic_write_json, fingerprint
from workflows.config import PipelineConfig
from workflows.dag import STAGE, Layout, Plan, StageRun, plan, save_plan_state
from workflows.lease import run_lease
from workflows.prepared import PreparedData
from workflows.registry.references import champion_files, resolve_adapter
from workflows.report import write_report
from workflows.storage import WorkStore

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


# ----------------------------------------------------------------------------- the Ray session

class RaySession:
    """Starts or joins Ray on first `ensure()`; `close()` shuts down only a Ray this session started."""

    def __init__(self, config: PipelineConfig, log: Log = _stderr):
        self.config, self.log, self.started = config, log, False

    def ensure(self) -> None:
        import ray

        if ray.is_initialized():
            return
        cluster = self.config.cluster
        # Inside a Ray Job (`ray job submit -- loraflow run ...`) RAY_ADDRESS names the cluster to join.
        address = cluster.address or ("auto" if os.environ.get("RAY_ADDRESS") else None)
        if address:
            ray.init(address=address, log_to_driver=True)
            check_shared_storage(Layout.of(self.config).store)
        else:
            train = self.config.train
            # Train workers hold their CPUs for the whole fit; leave at least 2 logical CPUs for Ray
            # Data (a 2-core box deadlocks silently otherwise).
            want = int(train.num_workers * train.cpus_per_worker + 0.999) + 2
            # The dashboard also serves the state API Ray Train's placement-group cleaner polls;
            # without it that monitor thread fails noisily. Bound to 127.0.0.1: nothing is exposed.
            ray.init(num_cpus=cluster.num_cpus or max(os.cpu_count() or 1, want), include_dashboard=cluster.dashboard,
                     dashboard_host="127.0.0.1", log_to_driver=True)
        self.started = True
        self.log(f"[ray] connected: {ray.cluster_resources().get('CPU', 0):.0f} CPUs, {len(ray.nodes())} node(s)")

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()
            self.started = False


@contextlib.contextmanager
def ray_session(config: PipelineConfig, log: Log = _stderr, start: bool = False) -> Iterator[RaySession]:
    """A Ray session for a block: started at once with `start`, else on the first `ensure()`."""
    session = RaySession(config, log)
    try:
        if start:
            session.ensure()
        yield session
    finally:
        session.close()


def check_shared_storage(store: WorkStore) -> None:
    """On more than one node, the work directory must be storage every node sees.

    Every node reads a marker the driver wrote, through the same filesystem object the stages use:
    a local directory must be a volume mounted on every node; an object store must be reachable
    (endpoint, credentials) from every node.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) <= 1:
        return
    name = ".shared-storage-check"
    token = new_run_id()
    store.write_text(token, name)

    @ray.remote(num_cpus=0)
    def sees(fs, path: str) -> bool:
        try:
            with fs.open_input_stream(path) as f:
                return f.read().decode() == token
        except OSError:
            return False

    refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(store.fs, store.path_of(name)) for n in alive]
    blind = [n["NodeManagerAddress"] for n, ok in zip(alive, ray.get(refs)) if not ok]
    if blind and store.remote:
        raise RuntimeError(
            f"work directory {store.uri} cannot be read from node(s) {', '.join(blind)}: give every node "
            "credentials for the bucket (the endpoint setting travels from the driver)")
    if blind:
        raise RuntimeError(
            f"work directory {store.uri} is not visible from node(s) {', '.join(blind)}: on a multi-node cluster "
            "set cluster.work_dir to storage every node mounts (a shared volume) or to an object store "
            "(s3://bucket/prefix) so Ray Train checkpoints and stage outputs are reachable everywhere")


# ----------------------------------------------------------------------------- running the DAG

def _run_stages(p: Plan, run_id: str, ray: RaySession, until: str | None, log: Log,
                manifest: dict[str, Any], lease_held: Callable[[], None] = lambda: None) -> None:
    outputs: dict[str, dict[str, Any]] = {}
    for st in p.stages:
        stage = STAGE[st.name]
        log(f"==> [{st.name}] {'running' if st.fresh else 'cached'} ({st.why}) fingerprint {st.fingerprint}")
        if st.fresh and stage.needs_ray:
            ray.ensure()
        t0 = time.time()
        run = StageRun(p, st, {u: outputs[u] for u in stage.upstream}, run_id)
        replacing = p.layout.store.replacing(st.name, st.fingerprint) if st.status == "forced" \
            else contextlib.nullcontext()
        try:
            lease_held()  # a driver whose work-store lease was taken over stops before it writes more
            if st.fresh:
                p.layout.store.clear_staging(st.name, st.fingerprint)
            with replacing:
                outputs[st.name] = stage.body(run)
        except BaseException as e:  # what the report of a failed run says
            manifest["error"] = {"stage": st.name, "type": type(e).__name__, "message": str(e)}
            raise
        manifest["stages"][st.name] = {"fingerprint": st.fingerprint, "status": "ran" if st.fresh else "hit",
                                       "why": st.why, "seconds": round(time.time() - t0, 3),
                                       "outputs": outputs[st.name]}
        save_plan_state(p, completed=[st.name])
        if st.name == until:
            break


def run_pipeline(config: PipelineConfig, force_from: str | None = None, until: str | None = None,
                 log: Log | None = None, run_id: str | None = None) -> dict[str, Any]:
    """Run the DAG (or its prefix up to `until`) and return the run manifest. A Ray this call
    starts is shut down at the end; one it found running is left running. A failed run still
    writes its manifest and report (what ran, what failed, how to resume) before the error goes on."""
    log = log or _stderr
    layout = Layout.of(config)
    layout.store.check(write=True)  # an unusable bucket fails here, naming the URI, before any stage
    tracking.check_tracking(config)  # MLflow asked for but not installed: before anything runs
    run_id = run_id or new_run_id()
    run_dir = layout.runs / run_id
    manifest: dict[str, Any] = {"run_id": run_id, "loraflow_version": __version__, "config_file": config.source_path,
                                "started": time.time(), "stages": {}, "ray_started": False}
    # One driver per work directory: a second local run waits; on S3 a second driver (any machine)
    # fails at once naming the holder (workflows.lease), before it has a run to report.
    with run_lease(layout.store, run_id, wait=True) as lease_held:
        try:
            with ray_session(config, log) as ray:
                try:
                    p = plan(config, force_from=force_from)  # under the lease: another run may have finished stages
                    _run_stages(p, run_id, ray, until, log, manifest, lease_held)
                finally:
                    manifest["ray_started"] = ray.started
        except BaseException as e:
            manifest.setdefault("error", {"stage": None, "type": type(e).__name__, "message": str(e)})
            raise
        finally:
            manifest["finished"] = time.time()
            manifest["report"] = str(write_report(run_dir, manifest))
            atomic_write_json(run_dir / "manifest.json", manifest)
            _track(config, manifest, run_dir, log)
    return manifest


def _track(config: PipelineConfig, manifest: dict[str, Any], run_dir: Path, log: Log) -> None:
    """TensorBoard event files and MLflow (`workflows.tracking`), recorded in the manifest. A failed
    run's own error wins over a tracking failure, which is then only logged."""
    try:
        manifest["tracking"] = tracking.log_run(config, manifest, run_dir, log)
    except Exception as e:
        if "error" not in manifest:
            raise
        log(f"warning: tracking this failed run failed too: {e}")
    atomic_write_json(run_dir / "manifest.json", manifest)


def evaluate_adapter(config: PipelineConfig, adapter: str, log: Log | None = None,
                     run_id: str | None = None) -> dict[str, Any]:
    """`loraflow evaluate --adapter`: score any adapter (a folder, URI or registry reference) against
    the base and the champion on the config's prepared eval rows (prepare runs first if not cached).
    `run_id` names the run whose manifest and log the prepare part writes."""
    from workflows.evaluate.stage import run_evaluate

    resolved = resolve_adapter(adapter, config.registry.root)
    with ray_session(config, log or _stderr, start=True):  # one session for prepare and evaluate
        manifest = run_pipeline(config, until="prepare", log=log, run_id=run_id)
        prepared = PreparedData.load(manifest["stages"]["prepare"]["outputs"]["dir"])
        key = fingerprint(resolved.token, config.section("eval"), new_run_id())
        out = Layout.of(config).work / "evaluate" / f"adhoc-{key}"
        result = run_evaluate(config, prepared, AdapterFiles.read(resolved.location, resolved.ref), out,
                              champion=champion_files(config))
    return {"dir": str(out), "metrics": result.metrics}
