"""Scheduled retraining: what cron, a Kubernetes CronJob, a RayCronJob or Airflow calls.

`retrain(config)` digests the input data first (plain file hashing: no Ray, no torch) and returns
"no change" when the current champion was trained on exactly that content. Otherwise it runs the
DAG (optionally warm-starting from the champion), which evaluates the new adapter against the
champion on the same frozen eval rows and moves `champion` only through the promotion gate. A lock
makes two concurrent calls safe: the second waits or exits saying so. After a crash the next call
resumes, because the DAG itself resumes.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workflows.config import PipelineConfig
from workflows.dag import Layout, LockHeldError


@dataclass
class RetrainOutcome:
    status: str  # "no-change" | "promoted" | "kept-champion"
    input_digest: str
    champion_before: str | None
    champion_after: str | None
    decision: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    report: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@contextlib.contextmanager
def retrain_lock(work: Path, wait: bool) -> Iterator[None]:
    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".retrain.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LockHeldError(f"another `loraflow retrain` is running on {work} (lock {work / '.retrain.lock'}); "
                                "pass --wait to queue behind it") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def champion_state(config: PipelineConfig) -> tuple[str | None, str | None]:
    """(champion ref, the input digest it was trained on), or (None, None) without a champion."""
    from workflows.registry.sqlite import Registry

    reg = Registry(config.registry.root)
    version = reg.alias_version(config.registry.name, config.registry.alias)
    if version is None:
        return None, None
    ref = f"{config.registry.name}:{version}"
    return ref, (reg.get(ref).lineage or {}).get("input_digest")


def retrain(config: PipelineConfig, warm_start: bool = False, wait: bool = False,
            log: Callable[[str], None] | None = None,
            input_digest: Callable[[PipelineConfig], str] | None = None) -> RetrainOutcome:
    if input_digest is None:
        from workflows.prepare.inputs import input_digest
    with retrain_lock(Layout.of(config).work, wait=wait):
        digest = input_digest(config)
        champion, champion_digest = champion_state(config)
        if champion is not None and champion_digest == digest:
            return RetrainOutcome("no-change", digest, champion, champion)
        if warm_start and champion is not None:
            config.train.init_adapter = f"{config.registry.name}@{config.registry.alias}"
        from workflows.pipeline import run_pipeline

        manifest = run_pipeline(config, log=log)
    decision = manifest["stages"]["register"]["outputs"].get("decision") or {}
    after, _ = champion_state(config)
    status = "promoted" if decision.get("promote") else "kept-champion"
    return RetrainOutcome(status, digest, champion, after, decision, manifest["run_id"], manifest.get("report"))
