"""Scheduled retraining: what cron, a Kubernetes CronJob, a RayCronJob or Airflow calls.

`retrain(config)` digests the input data first (plain file hashing: no Ray, no torch) and returns
"no change" when the current champion was trained on exactly that content. Otherwise it runs the
DAG (optionally warm-starting from the champion), which evaluates the new adapter against the
champion on the same frozen eval rows and moves `champion` only through the promotion gate. A lock
makes two concurrent calls safe: the second waits or exits saying so. After a crash the next call
resumes, because the DAG itself resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workflows.artifacts import file_lock
from workflows.config import PipelineConfig
from workflows.dag import Layout
from workflows.pipeline import run_pipeline
from workflows.prepare.inputs import input_digest as digest_inputs
from workflows.registry.sqlite import Registry


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


def champion_state(config: PipelineConfig) -> tuple[str | None, str | None]:
    """(champion ref, the input digest it was trained on), or (None, None) without a champion."""
    reg = Registry.existing(config.registry.root)
    version = reg.alias_version(config.registry.name, config.registry.alias) if reg else None
    if version is None:
        return None, None
    ref = f"{config.registry.name}:{version}"
    return ref, (reg.get(ref).lineage or {}).get("input_digest")


def retrain(config: PipelineConfig, warm_start: bool = False, wait: bool = False,
            log: Callable[[str], None] | None = None,
            input_digest: Callable[[PipelineConfig], str] | None = None, run_id: str | None = None) -> RetrainOutcome:
    input_digest = input_digest or digest_inputs
    work = Layout.of(config).work
    held = (f"another `loraflow retrain` is running on {work} (lock {work / '.retrain.lock'}); "
            "pass --wait to queue behind it")
    with file_lock(work / ".retrain.lock", wait, held):
        digest = input_digest(config)
        champion, champion_digest = champion_state(config)
        if champion is not None and champion_digest == digest:
            return RetrainOutcome("no-change", digest, champion, champion)
        if warm_start and champion is not None:
            config.train.init_adapter = f"{config.registry.name}@{config.registry.alias}"
        manifest = run_pipeline(config, log=log, run_id=run_id)
    decision = manifest["stages"]["register"]["outputs"].get("decision") or {}
    after, _ = champion_state(config)
    status = "promoted" if decision.get("promote") else "kept-champion"
    return RetrainOutcome(status, digest, champion, after, decision, manifest["run_id"], manifest.get("report"))
