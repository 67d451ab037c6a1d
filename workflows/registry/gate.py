"""The promotion gate: does a new adapter replace the champion?

`decide` is a pure function of the gate config and two metric dicts measured on the same eval rows
(the evaluate stage scores new and champion in one pass, so their numbers are comparable; metrics
stored at registration time from another eval set are not). The register stage
(`workflows.registry.stage`) applies it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from workflows.config import GateSection

# Direction of a metric by name, for guards (the gated metric's direction is configured).
_LOWER_IS_BETTER = ("loss", "perplexity")
_HIGHER_IS_BETTER = ("accuracy", "f1", "match")


class GateError(ValueError):
    """The gate cannot judge: a configured metric is missing or has no known direction."""


@dataclass(frozen=True)
class Decision:
    """The gate's verdict. `numbers` holds every figure it looked at, for the alias history."""

    promote: bool
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)
    alias: str = "champion"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def metric_direction(name: str) -> str:
    """"min" for losses/perplexities, "max" for accuracies/F1/match rates (by name suffix)."""
    key = name.lower()
    if key.endswith(_LOWER_IS_BETTER):
        return "min"
    if key.endswith(_HIGHER_IS_BETTER):
        return "max"
    raise GateError(f"guard metric {name!r}: unknown direction (known: names ending in "
                    f"{_LOWER_IS_BETTER} are lower-is-better, {_HIGHER_IS_BETTER} higher-is-better)")


def _value(metrics: dict[str, Any], metric: str, who: str) -> float:
    if metric not in metrics:
        raise GateError(f"gate metric {metric!r} not in the {who} metrics (available: {sorted(metrics)})")
    return float(metrics[metric])


def _improvement(new: float, old: float, direction: str) -> float:
    """How much better `new` is than `old`, in the metric's units (positive = better)."""
    return (old - new) if direction == "min" else (new - old)


def decide(gate: GateSection, new_metrics: dict[str, Any], champion_metrics: dict[str, Any] | None,
           ci95: list[float] | None = None) -> Decision:
    """Promote when the gated metric improves by more than `min_delta` and no guard metric regresses
    by more than its bound. Without a champion, promote iff `promote_first`. Non-finite values never
    promote. `ci95` (the eval's bootstrap interval of new - champion) is recorded, not used."""
    metric = gate.metric
    new = _value(new_metrics, metric, "new adapter's")
    numbers: dict[str, Any] = {"metric": metric, "direction": gate.direction, "new": new, "min_delta": gate.min_delta}
    if champion_metrics is None:
        if gate.promote_first:
            return Decision(True, f"first adapter: no champion yet ({metric}={new:.6g})", numbers)
        return Decision(False, "no champion yet and registry.gate.promote_first is off", numbers)

    old = _value(champion_metrics, metric, "champion's")
    gain = _improvement(new, old, gate.direction)
    numbers.update(champion=old, delta=new - old, improvement=gain)
    if ci95 is not None:
        numbers["ci95_new_minus_champion"] = list(ci95)
    if not (math.isfinite(new) and math.isfinite(old)):
        return Decision(False, f"{metric} is not finite (new {new}, champion {old})", numbers)

    guards, failed = {}, []
    for guard, bound in sorted(gate.guards.items()):
        g_new, g_old = _value(new_metrics, guard, "new adapter's"), _value(champion_metrics, guard, "champion's")
        regression = -_improvement(g_new, g_old, metric_direction(guard))
        ok = math.isfinite(regression) and regression <= bound
        guards[guard] = {"new": g_new, "champion": g_old, "regression": regression, "bound": bound, "ok": ok}
        if not ok:
            failed.append(f"{guard} regressed by {regression:.6g} > {bound:g}")
    numbers["guards"] = guards

    if gain <= gate.min_delta:
        return Decision(False, f"{metric} {new:.6g} vs champion {old:.6g}: improvement {gain:.6g} "
                               f"is not above min_delta {gate.min_delta:g}", numbers)
    if failed:
        return Decision(False, f"{metric} improved by {gain:.6g} but guard failed: " + "; ".join(failed), numbers)
    return Decision(True, f"{metric} {new:.6g} vs champion {old:.6g}: improved by {gain:.6g} "
                          f"(> min_delta {gate.min_delta:g})", numbers)
