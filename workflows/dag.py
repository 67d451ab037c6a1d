"""The stage graph: prepare → train → evaluate → register, content-keyed, cached and resumable.

Ray Workflows is gone from Ray 2.60 and `ray.dag.execute()` is deprecated, so the graph is ours:
four stages declared once in `STAGES`, each a function of the config and its upstream outputs.
Ray does the distributed work *inside* a stage (Ray Data, Ray Train); the driver only decides
what to run. A stage's output directory is keyed by its fingerprint and counts only with its
`_SUCCESS` marker, so a re-run skips finished stages and a killed run resumes at the first
unfinished one (training continues from its last registered Ray Train checkpoint, because the
Ray Train run name is stable for a fingerprint until a forced rerun bumps its attempt counter).

The work directory may be an object store (`s3://bucket/prefix`, `workflows.storage`): stages then
write into a local staging copy that is uploaded with `_SUCCESS` last, and a stage counts as done
iff `<work>/<stage>/<fingerprint>/_SUCCESS` exists in the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workflows import __version__
from workflows.artifacts import fingerprint
from workflows.config import PipelineConfig, check_runs_dir
from workflows.storage import WorkStore


@dataclass(frozen=True)
class Stage:
    name: str
    upstream: tuple[str, ...]
    sections: tuple[str, ...]  # config sections that feed the fingerprint
    needs_ray: bool


# The graph, declared in one place. Order is a topological order.
STAGES: tuple[Stage, ...] = (
    Stage("prepare", (), ("model", "data"), needs_ray=True),
    Stage("train", ("prepare",), ("model", "lora", "train"), needs_ray=True),
    Stage("evaluate", ("prepare", "train"), ("eval",), needs_ray=True),
    Stage("register", ("evaluate", "train"), ("registry",), needs_ray=False),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def _local(path: str) -> Path:
    return Path(path).expanduser().resolve()


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
        return cls(work=store.local, runs=_local(config.cluster.runs_dir), store=store)

    def stage_dir(self, stage: str, fp: str) -> Path:
        return self.work / stage / fp

    @property
    def ray_storage(self) -> str:
        """Ray Train's `storage_path`: follows the work directory (a URI on an object store)."""
        return self.store.uri_of("ray_train")


@dataclass
class PlannedStage:
    name: str
    fingerprint: str
    dir: Path  # the local directory the stage writes (a staging copy when the work dir is remote)
    uri: str  # where the output is committed: str(dir), or its object store URI
    components: dict[str, Any]
    status: str  # "hit" | "miss" | "forced"
    why: str


@dataclass
class Plan:
    config: PipelineConfig
    layout: Layout
    stages: list[PlannedStage] = field(default_factory=list)

    def __getitem__(self, name: str) -> PlannedStage:
        return next(s for s in self.stages if s.name == name)

    @property
    def to_run(self) -> list[PlannedStage]:
        return [s for s in self.stages if s.status != "hit"]


def _why_changed(name: str, components: dict[str, Any], previous: dict[str, Any]) -> str:
    before = previous.get(name, {}).get("components")
    if not before:
        return "never ran with this work directory"
    changed = sorted(k for k in set(components) | set(before) if components.get(k) != before.get(k))
    if not changed:
        return "output missing (deleted, or the last attempt did not finish)"
    labels = {"input_digest": "input data changed", "version": "loraflow version changed"}
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
        if stage.name == "prepare":
            components["input_digest"] = input_digest(config)
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


class LockHeldError(RuntimeError):
    """Another driver holds the work directory's lock."""


@contextlib.contextmanager
def work_lock(work: Path, wait: bool = True) -> Iterator[None]:
    """One driver per work directory at a time (a second `loraflow run` waits, or fails with wait=False).

    `work` is `Layout.work`: for an object store, the local mirror keyed by the URI, so this guards
    runs on one machine only; concurrent runs from different machines on one prefix are not guarded.
    """
    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".lock", "w") as f:
        flags = fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(f, flags)
        except BlockingIOError:
            raise LockHeldError(f"another loraflow run holds {work / '.lock'}") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def attempt_of(layout: Layout, fp: str) -> int:
    text = layout.store.read_text("train", f".{fp}.attempt")
    return int(text) if text else 0


def bump_attempt(layout: Layout, fp: str) -> int:
    """A forced train rerun needs a new Ray Train run name: re-running a finished run returns the old result.

    The counter lives in the work directory (the store), beside the Ray Train runs it names.
    """
    n = attempt_of(layout, fp) + 1
    layout.store.write_text(str(n), "train", f".{fp}.attempt")
    return n


def save_plan_state(p: Plan, completed: list[str] | None = None) -> None:
    """Remember the inputs of the stages that completed, so a later plan can say *why* it misses."""
    state = _read_state(p.layout)
    for s in p.stages:
        if completed is None or s.name in completed:
            state[s.name] = {"fingerprint": s.fingerprint, "components": s.components}
    p.layout.store.write_text(json.dumps(state, indent=2, sort_keys=True, default=str) + "\n", STATE_FILE)
