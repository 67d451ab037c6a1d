"""The stage graph, declared once: prepare → train → evaluate → register.

`STAGES` (at the bottom) is the one table of the graph. Per stage it says what the stage reads from
other stages (`upstream`), which config sections and which outside inputs its output depends on
(`sections`, `external`), whether it needs Ray, and its `body`. Everything else derives from it:
fingerprints (`plan`), the order of execution and what each body is handed (`workflows.pipeline`).

Ray Workflows is gone from Ray 2.60 and `ray.dag.execute()` is deprecated, so the graph is ours;
Ray does the distributed work *inside* a stage (Ray Data, Ray Train). A stage's output directory is
keyed by its fingerprint and counts only with its `_SUCCESS` marker, so a re-run skips finished
stages and a killed run resumes at the first unfinished one (training continues from its last
registered Ray Train checkpoint: the Ray Train run name is stable for a fingerprint until a forced
rerun bumps its attempt counter).

Outside inputs are pinned before anything is fingerprinted: the input data by content
(`input_data`), a warm-start adapter and the champion by registry version and content hash
(`init_adapter`, `champion`), so a promotion reruns exactly what depends on the champion. Bodies
import their stage lazily: planning (`loraflow dag`) starts neither Ray nor torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workflows import __version__, tracking
from workflows.adapters import AdapterFiles
from workflows.artifacts import atomic_write_json, fingerprint, stage_output
from workflows.config import PipelineConfig, check_runs_dir
from workflows.prepared import PreparedData
from workflows.registry.references import ResolvedAdapter, champion_for, resolve_adapter
from workflows.registry.sqlite import Registry
from workflows.storage import WorkStore, join, read_json


@dataclass(frozen=True)
class Stage:
    name: str
    upstream: tuple[str, ...]  # stages whose outputs the body reads (and nothing else)
    sections: tuple[str, ...]  # config sections that feed the fingerprint
    external: tuple[str, ...]  # outside inputs that feed the fingerprint: input_data, init_adapter, champion
    needs_ray: bool
    body: Callable[[StageRun], dict[str, Any]]  # runs (or reuses) the stage; returns its JSON outputs


# ----------------------------------------------------------------------------- where outputs live

@dataclass
class Layout:
    """Where a config's artifacts live. Local paths are relative to the working directory.

    `store` is where stage outputs count (`cluster.work_dir`, local or an object store); `work` is
    the local folder stages write into and locks live in: the work directory itself, or for an
    object store its local mirror. Run records (`runs`) always stay local.
    """

    work: Path
    runs: Path
    store: WorkStore

    @classmethod
    def of(cls, config: PipelineConfig) -> Layout:
        check_runs_dir(config)
        store = WorkStore.open(config.cluster.work_dir)
        return cls(work=store.local, runs=Path(config.cluster.runs_dir).expanduser().resolve(), store=store)

    def stage_dir(self, stage: str, fp: str) -> Path:
        return self.work / stage / fp

    @property
    def ray_storage(self) -> str:
        """Ray Train's `storage_path`: follows the work directory (a URI on an object store)."""
        return self.store.uri_of("ray_train")

    def attempt(self, fp: str, bump: bool = False) -> int:
        """The train attempt counter of fingerprint `fp` (in the store, beside the Ray Train runs it
        names). A forced rerun bumps it: re-running a finished Ray Train run returns the old result."""
        text = self.store.read_text("train", f".{fp}.attempt")
        n = (int(text) if text else 0) + (1 if bump else 0)
        if bump:
            self.store.write_text(str(n), "train", f".{fp}.attempt")
        return n


# ----------------------------------------------------------------------------- the plan

@dataclass
class PlannedStage:
    name: str
    fingerprint: str
    dir: Path  # the local directory the stage writes (a staging copy when the work dir is remote)
    uri: str  # where the output is committed: str(dir), or its object store URI
    components: dict[str, Any]
    status: str  # "hit" | "miss" | "forced"
    why: str

    @property
    def fresh(self) -> bool:
        return self.status != "hit"


@dataclass
class Plan:
    config: PipelineConfig
    layout: Layout
    stages: list[PlannedStage] = field(default_factory=list)
    adapters: dict[str, ResolvedAdapter] = field(default_factory=dict)  # "init_adapter", "champion"

    def __getitem__(self, name: str) -> PlannedStage:
        return next(s for s in self.stages if s.name == name)


def _why_changed(name: str, components: dict[str, Any], previous: dict[str, Any]) -> str:
    before = previous.get(name, {}).get("components")
    if not before:
        return "never ran with this work directory"
    changed = sorted(k for k in set(components) | set(before) if components.get(k) != before.get(k))
    if not changed:
        return "output missing (deleted, or the last attempt did not finish)"
    labels = {"input_data": "input data changed", "version": "loraflow version changed",
              "init_adapter": "warm-start adapter changed", "champion": "champion changed"}
    parts = [labels.get(k, f"{k.removeprefix('upstream:')} upstream changed" if k.startswith("upstream:")
                        else f"`{k}` section changed") for k in changed]
    return ", ".join(parts)


def plan(config: PipelineConfig, force_from: str | None = None,
         input_digest: Callable[[PipelineConfig], str] | None = None) -> Plan:
    """Fingerprint every stage and decide hit/miss without running anything (no Ray, no torch)."""
    if force_from is not None and force_from not in STAGE_NAMES:
        raise ValueError(f"--from {force_from!r}: choose one of {', '.join(STAGE_NAMES)}")
    if input_digest is None:
        from workflows.prepare.inputs import input_digest
    layout = Layout.of(config)
    layout.store.check()
    previous = _read_state(layout)
    result = Plan(config, layout)
    forced = False
    fps: dict[str, str] = {}
    for stage in STAGES:
        components: dict[str, Any] = {s: fingerprint(config.section(s)) for s in stage.sections}
        components.update({f"upstream:{u}": fps[u] for u in stage.upstream})
        components["version"] = __version__
        for name in stage.external:
            if name == "input_data":
                components[name] = input_digest(config)
                continue
            adapter = (resolve_adapter(config.train.init_adapter, config.registry.root)
                       if name == "init_adapter" and config.train.init_adapter
                       else champion_for(config, fps["train"]) if name == "champion" else None)
            components[name] = adapter.token if adapter else None
            if adapter:
                result.adapters[name] = adapter
        fp = fingerprint(stage.name, components)
        fps[stage.name] = fp
        forced = forced or stage.name == force_from
        if forced:
            status, why = "forced", f"--from {force_from}"
        elif layout.store.is_complete(stage.name, fp):
            status, why = "hit", "output exists"
        else:
            status, why = "miss", _why_changed(stage.name, components, previous)
        result.stages.append(PlannedStage(stage.name, fp, layout.stage_dir(stage.name, fp),
                                          layout.store.uri_of(stage.name, fp), components, status, why))
    return result


STATE_FILE = "last_plan.json"


def _read_state(layout: Layout) -> dict[str, Any]:
    try:
        return json.loads(layout.store.read_text(STATE_FILE) or "{}")
    except json.JSONDecodeError:
        return {}


def save_plan_state(p: Plan, completed: list[str] | None = None) -> None:
    """Remember the inputs of the stages that completed, so a later plan can say *why* it misses."""
    state = _read_state(p.layout)
    for s in p.stages:
        if completed is None or s.name in completed:
            state[s.name] = {"fingerprint": s.fingerprint, "components": s.components}
    p.layout.store.write_text(json.dumps(state, indent=2, sort_keys=True, default=str) + "\n", STATE_FILE)


# ----------------------------------------------------------------------------- the bodies

@dataclass
class StageRun:
    """What a body is handed: the plan, its own planned stage, and the outputs of its declared
    upstream stages only (`inputs`; anything else is not there to read)."""

    plan: Plan
    stage: PlannedStage
    inputs: Mapping[str, dict[str, Any]]
    run_id: str

    @property
    def config(self) -> PipelineConfig:
        return self.plan.config

    def publish(self) -> None:
        """Commit the freshly written stage directory to the work store (a no-op when local)."""
        self.plan.layout.store.publish(self.stage.name, self.stage.fingerprint)


def _prepare(run: StageRun) -> dict[str, Any]:
    if run.stage.fresh:
        from workflows.prepare.stage import run_prepare

        # Every node writes straight to the stage's place in the store, committed by run_prepare.
        run_prepare(run.config, run.stage.uri)
    # Remote: the shards are read straight from the store, by whichever node reads them.
    m = PreparedData.load(run.stage.uri).manifest
    return {"dir": run.stage.uri, "counts": m.get("counts", {}), "input_digest": m.get("input_digest"),
            "rows_digest": m.get("rows_digest"), "tokens": m.get("tokens", {})}


def _train(run: StageRun) -> dict[str, Any]:
    st = run.stage
    if st.fresh:
        from workflows.train.stage import run_train

        layout = run.plan.layout
        init = run.plan.adapters.get("init_adapter")
        run_train(run.config, PreparedData.load(run.inputs["prepare"]["dir"]), st.dir,
                  storage_path=layout.ray_storage,
                  run_name=f"{st.fingerprint}-a{layout.attempt(st.fingerprint, bump=st.status == 'forced')}",
                  init_adapter=init.files() if init else None)
        run.publish()
    result = read_json(join(st.uri, "result.json"))
    return {"dir": st.uri, "adapter": join(st.uri, "adapter"), "metrics_path": join(st.uri, "metrics.jsonl"),
            **{k: result[k] for k in ("run_name", "metrics") if k in result}}


def _evaluate(run: StageRun) -> dict[str, Any]:
    if run.stage.fresh:
        from workflows.evaluate.stage import run_evaluate

        champion = run.plan.adapters.get("champion")
        run_evaluate(run.config, PreparedData.load(run.inputs["prepare"]["dir"]),
                     AdapterFiles.read(run.inputs["train"]["adapter"]), run.stage.dir,
                     champion=champion.files() if champion else None)
        run.publish()
    return {"dir": run.stage.uri, "metrics": read_json(join(run.stage.uri, "metrics.json"))}


def _register(run: StageRun) -> dict[str, Any]:
    if run.stage.fresh:
        from workflows.registry.stage import register_and_gate

        prep, init = run.inputs["prepare"], run.plan.adapters.get("init_adapter")
        lineage = {
            "parent_adapter": init.ref if init else None,
            "run_id": run.run_id,
            "input_digest": prep.get("input_digest"),
            "prepared_manifest_digest": prep.get("rows_digest"),
            "config": run.config.model_dump(mode="json"),
            "loraflow_version": __version__,
            "fingerprints": {s.name: s.fingerprint for s in run.plan.stages},
        }
        with AdapterFiles.read(run.inputs["train"]["adapter"]).materialized() as adapter_dir:
            version, decision = register_and_gate(run.config, adapter_dir, run.inputs["evaluate"]["metrics"], lineage)
        with stage_output(run.stage.dir) as tmp:
            atomic_write_json(tmp / "register.json", {"name": run.config.registry.name, "version": version,
                                                     "decision": decision.to_dict()})
        run.publish()
        # After the commit: an MLflow outage fails the run but never the registration (a rerun is a
        # cache hit, and the end-of-run tracking mirrors the version again).
        tracking.mirror_registration(run.config, Registry(run.config.registry.root), run.config.registry.name, version)
    return {"dir": run.stage.uri, **read_json(join(run.stage.uri, "register.json"))}


# The graph. Order is a topological order.
STAGES: tuple[Stage, ...] = (
    Stage("prepare", upstream=(), sections=("model", "data"), external=("input_data",),
          needs_ray=True, body=_prepare),
    Stage("train", upstream=("prepare",), sections=("model", "lora", "train"), external=("init_adapter",),
          needs_ray=True, body=_train),
    Stage("evaluate", upstream=("prepare", "train"), sections=("eval",), external=("champion",),
          needs_ray=True, body=_evaluate),
    Stage("register", upstream=("prepare", "train", "evaluate"), sections=("registry",), external=(),
          needs_ray=False, body=_register),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
STAGE = {s.name: s for s in STAGES}
