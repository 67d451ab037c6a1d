"""The register stage: register the new adapter, run the promotion gate, record the decision."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workflows.config import PipelineConfig
from workflows.registry.base import AliasConflict, Ref
from workflows.registry.gate import Decision, GateError, decide
from workflows.registry.sqlite import Registry


def _base_identity_from_adapter(adapter_dir: Path) -> dict[str, Any] | None:
    meta = adapter_dir / "loraflow.json"
    if not meta.is_file():
        return None
    data = json.loads(meta.read_text())
    return data.get("base_model") or data.get("base")


def register_and_gate(config: PipelineConfig, adapter_dir: str | Path, eval_metrics: dict[str, Any],
                      lineage: dict[str, Any] | None = None, registry=None,
                      tags: dict[str, str] | None = None) -> tuple[int, Decision]:
    """Register the adapter under `config.registry.name`, run the gate against the champion the
    evaluate stage scored (`eval_metrics` is its metrics.json), record the decision and move
    `config.registry.alias` when it passes.

    Idempotent for a retried DAG: the same adapter returns the same version; if it already holds
    the alias, nothing new is recorded. If the alias moved after evaluation (another run promoted
    in between), the decision is "not promoted: evaluate again", never a comparison against
    numbers from another eval set.
    """
    reg = registry if registry is not None else Registry(config.registry.root)
    name, alias = config.registry.name, config.registry.alias
    adapter_dir = Path(adapter_dir)
    lineage = dict(lineage or {})
    lineage.setdefault("base_model", _base_identity_from_adapter(adapter_dir))
    models = eval_metrics.get("models", {})
    if "new" not in models:
        raise GateError("evaluate metrics have no 'new' model entry (expected metrics.json from run_evaluate)")
    version = reg.register(adapter_dir, name, metrics=models["new"], lineage=lineage, tags=tags)

    holder = reg.alias_version(name, alias)
    if holder == version:
        return version, Decision(True, f"{name}:{version} already holds @{alias} (a retried run)",
                                 {"metric": config.registry.gate.metric}, alias)
    evaluated = eval_metrics.get("champion_ref")
    evaluated_version = Ref.parse(evaluated).version if evaluated else None
    if evaluated_version != holder:
        decision = Decision(False, f"@{alias} is {name}:{holder} but evaluation compared against "
                                   f"{evaluated or 'no champion'}; evaluate again", {"champion_ref": evaluated}, alias)
    else:
        diff = eval_metrics.get("diff", {}).get(config.registry.gate.metric, {})
        d = decide(config.registry.gate, models["new"], models.get("champion") if holder else None, diff.get("ci95"),
                   base_metrics=models.get("base"), ci95_vs_base=diff.get("ci95_vs_base"))
        decision = Decision(d.promote, d.reason, {**d.numbers, "champion_ref": evaluated,
                                                  "new_ref": f"{name}:{version}"}, alias)
    try:
        reg.record_decision(name, version, alias, decision.promote, decision.reason, decision.numbers,
                            expected_holder=holder)
    except AliasConflict as e:  # someone promoted between our read and our write
        decision = Decision(False, str(e), decision.numbers, alias)
        reg.record_decision(name, version, alias, False, decision.reason, decision.numbers)
    return version, decision
