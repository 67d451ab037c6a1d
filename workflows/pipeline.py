"""Execute a plan: run each missing stage in order, reuse each hit, record the run.

Ray is started only when a stage that needs it has to run, so a fully cached re-run never
starts a cluster. Every run writes `runs/<run-id>/manifest.json` (fingerprints, inputs, outputs,
timings, registry version) and a report. With the work directory on an object store each stage
runs into a local staging directory that is then published (`workflows.storage`); the manifest
records the store URIs of the outputs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workflows import __version__
from workflows.artifacts import atomic_write_json, stage_output
from workflows.config import PipelineConfig
from workflows.dag import (
    Layout,
    Plan,
    PlannedStage,
    attempt_of,
    bump_attempt,
    new_run_id,
    plan,
    save_plan_state,
    work_lock,
)
from workflows.storage import WorkStore, join, read_json


@dataclass
class RunContext:
    config: PipelineConfig
    plan: Plan
    run_id: str
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    ray_started: bool = False
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)


def start_ray(config: PipelineConfig, log: Callable[[str], None]) -> bool:
    """Start a local Ray or join `cluster.address`; False when this process is already connected."""
    import ray

    if ray.is_initialized():
        return False
    cluster = config.cluster
    # Inside a Ray Job (`ray job submit -- loraflow run ...`) RAY_ADDRESS names the cluster to join.
    address = cluster.address or ("auto" if os.environ.get("RAY_ADDRESS") else None)
    if address:
        ray.init(address=address, log_to_driver=True)
        check_shared_storage(Layout.of(config).store)
    else:
        train = config.train
        # Train workers hold their CPUs for the whole fit; leave at least 2 logical CPUs for Ray Data
        # (a 2-core box deadlocks silently otherwise).
        want = int(train.num_workers * train.cpus_per_worker + 0.999) + 2
        num_cpus = cluster.num_cpus or max(os.cpu_count() or 1, want)
        # The dashboard also serves the state API Ray Train's placement-group cleaner polls; without
        # it that monitor thread fails noisily. Bound to 127.0.0.1: nothing is exposed.
        ray.init(num_cpus=num_cpus, include_dashboard=cluster.dashboard, dashboard_host="127.0.0.1",
                 log_to_driver=True)
    log(f"[ray] connected: {ray.cluster_resources().get('CPU', 0):.0f} CPUs, {len(ray.nodes())} node(s)")
    return True


def ensure_ray(ctx: RunContext) -> None:
    """Start or join Ray once, the first time a stage needs it (a fully cached run never does)."""
    ctx.ray_started = start_ray(ctx.config, ctx.log) or ctx.ray_started


def check_shared_storage(store: WorkStore) -> None:
    """On more than one node, the work directory must be storage every node sees.

    Every node reads a marker the driver wrote, through the same filesystem object the stages use:
    a local directory must be a volume mounted on every node; an object store must be reachable
    (endpoint, credentials) from every node.
    """
    import ray

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

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

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


# --- stage bodies: each returns a JSON-able summary of its outputs -----------------------------
# A fresh stage writes `st.dir` (local), then `_publish` commits it to the work directory's store
# (a no-op for a local work directory); summaries read the committed output at `st.uri`.


def _publish(ctx: RunContext, st: PlannedStage) -> None:
    ctx.plan.layout.store.publish(st.name, st.fingerprint)


def _local_output(ctx: RunContext, stage: str) -> Path:
    """An upstream stage's output as a local directory (downloaded once when the store is remote)."""
    return ctx.plan.layout.store.fetch(stage, ctx.plan[stage].fingerprint)


def _prepare(ctx: RunContext, st: PlannedStage, fresh: bool) -> dict[str, Any]:
    from workflows.prepare.stage import run_prepare
    from workflows.prepared import PreparedData

    if fresh:
        run_prepare(ctx.config, st.dir)
        _publish(ctx, st)
    # Remote: the shards are read straight from the store, by whichever node reads them.
    prepared = PreparedData.load(st.uri)
    ctx.outputs["prepare"]["prepared"] = prepared
    m = prepared.manifest
    return {"dir": st.uri, "counts": m.get("counts", {}), "input_digest": m.get("input_digest"),
            "rows_digest": m.get("rows_digest"), "tokens": m.get("tokens", {})}


def _train(ctx: RunContext, st: PlannedStage, fresh: bool) -> dict[str, Any]:
    if fresh:
        from workflows.train.stage import run_train

        layout = ctx.plan.layout
        attempt = bump_attempt(layout, st.fingerprint) if st.status == "forced" else attempt_of(layout, st.fingerprint)
        run_name = f"{st.fingerprint}-a{attempt}"
        run_train(ctx.config, ctx.outputs["prepare"]["prepared"], st.dir,
                  storage_path=layout.ray_storage, run_name=run_name)
        _publish(ctx, st)
    result = read_json(join(st.uri, "result.json"))
    return {"dir": st.uri, "adapter": join(st.uri, "adapter"), "metrics_path": join(st.uri, "metrics.jsonl"),
            **{k: result[k] for k in ("run_name", "metrics") if k in result}}


def _evaluate(ctx: RunContext, st: PlannedStage, fresh: bool) -> dict[str, Any]:
    if fresh:
        from workflows.evaluate.stage import run_evaluate
        from workflows.registry.sqlite import Registry

        registry = Registry(ctx.config.registry.root) if ctx.config.eval.compare_champion else None
        run_evaluate(ctx.config, ctx.outputs["prepare"]["prepared"], _local_output(ctx, "train") / "adapter",
                     st.dir, registry=registry)
        _publish(ctx, st)
    metrics = read_json(join(st.uri, "metrics.json"))
    return {"dir": st.uri, "metrics": metrics}


def _register(ctx: RunContext, st: PlannedStage, fresh: bool) -> dict[str, Any]:
    if fresh:
        from workflows.registry.stage import register_and_gate

        prep = ctx.outputs["prepare"]
        lineage = {
            "parent_adapter": _pinned_parent(ctx.config),
            "run_id": ctx.run_id,
            "input_digest": prep.get("input_digest"),
            "prepared_manifest_digest": prep.get("rows_digest"),
            "config": ctx.config.model_dump(mode="json"),
            "loraflow_version": __version__,
            "fingerprints": {s.name: s.fingerprint for s in ctx.plan.stages},
        }
        version, decision = register_and_gate(ctx.config, _local_output(ctx, "train") / "adapter",
                                              ctx.outputs["evaluate"]["metrics"], lineage)
        with stage_output(st.dir) as tmp:
            atomic_write_json(tmp / "register.json", {"name": ctx.config.registry.name, "version": version,
                                                     "decision": _as_dict(decision)})
        _publish(ctx, st)
    return {"dir": st.uri, **read_json(join(st.uri, "register.json"))}


def _pinned_parent(config: PipelineConfig) -> str | None:
    """The warm-start adapter as an immutable reference: `name@champion` moves, `name:3` does not."""
    ref = config.train.init_adapter
    if not ref or "@" not in ref or Path(ref).expanduser().exists():
        return ref
    from workflows.registry.base import Ref
    from workflows.registry.sqlite import Registry

    parsed = Ref.parse(ref)
    version = Registry(config.registry.root).alias_version(parsed.name, parsed.alias)
    return f"{parsed.name}:{version}" if version is not None else ref


def evaluate_adapter(config: PipelineConfig, adapter: str, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """`loraflow evaluate --adapter`: score any adapter (a folder or a registry reference) against the
    base and the champion on the config's prepared eval rows (prepare runs first if not cached)."""
    from workflows.artifacts import fingerprint
    from workflows.evaluate.stage import run_evaluate
    from workflows.prepared import PreparedData
    from workflows.registry.sqlite import Registry

    # One Ray session for both steps: run_pipeline leaves a Ray it did not start running.
    started = start_ray(config, log or print)
    try:
        manifest = run_pipeline(config, until="prepare", log=log)
        prepared = PreparedData.load(manifest["stages"]["prepare"]["outputs"]["dir"])
        out = Layout.of(config).work / "evaluate" / f"adhoc-{fingerprint(adapter, config.section('eval'), new_run_id())}"
        result = run_evaluate(config, prepared, adapter, out, registry=Registry(config.registry.root))
    finally:
        if started:
            import ray

            ray.shutdown()
    return {"dir": str(out), "metrics": result.metrics}


def _as_dict(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    return obj


STAGE_BODIES: dict[str, Callable[[RunContext, PlannedStage, bool], dict[str, Any]]] = {
    "prepare": _prepare, "train": _train, "evaluate": _evaluate, "register": _register,
}


def run_pipeline(config: PipelineConfig, force_from: str | None = None, until: str | None = None,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the DAG (or its prefix up to `until`) and return the run manifest."""
    from workflows.dag import STAGES

    layout = Layout.of(config)
    layout.store.check(write=True)  # an unusable bucket fails here, naming the URI, before any stage
    stages = {s.name: s for s in STAGES}
    with work_lock(layout.work):
        p = plan(config, force_from=force_from)  # under the lock: another run may have finished stages
        ctx = RunContext(config, p, new_run_id())
        if log:
            ctx.log = log
        run_dir = p.layout.runs / ctx.run_id
        manifest: dict[str, Any] = {"run_id": ctx.run_id, "loraflow_version": __version__,
                                    "config_file": config.source_path, "started": time.time(), "stages": {}}
        try:
            for st in p.stages:
                fresh = st.status != "hit"
                ctx.outputs[st.name] = {}
                banner = "running" if fresh else "cached"
                ctx.log(f"==> [{st.name}] {banner} ({st.why}) fingerprint {st.fingerprint}")
                if fresh and stages[st.name].needs_ray:
                    ensure_ray(ctx)
                if fresh:
                    p.layout.store.clear_staging(st.name, st.fingerprint)
                t0 = time.time()
                forced = st.status == "forced"
                with p.layout.store.replacing(st.name, st.fingerprint) if forced else contextlib.nullcontext():
                    ctx.outputs[st.name].update(STAGE_BODIES[st.name](ctx, st, fresh))
                manifest["stages"][st.name] = {
                    "fingerprint": st.fingerprint, "status": "ran" if fresh else "hit", "why": st.why,
                    "seconds": round(time.time() - t0, 3),
                    "outputs": {k: v for k, v in ctx.outputs[st.name].items() if k != "prepared"},
                }
                save_plan_state(p, completed=[st.name])
                if st.name == until:
                    break
        finally:
            manifest["finished"] = time.time()
            manifest["ray_started"] = ctx.ray_started
            atomic_write_json(run_dir / "manifest.json", manifest)
            if ctx.ray_started:
                import ray

                ray.shutdown()
    try:
        from workflows.report import write_report

        manifest["report"] = str(write_report(run_dir, manifest))
        atomic_write_json(run_dir / "manifest.json", manifest)
    except ImportError:
        pass
    return manifest
