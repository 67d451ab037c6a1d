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
           ci95: list[float] | None = None, base_metrics: dict[str, Any] | None = None,
           ci95_vs_base: list[float] | None = None) -> Decision:
    """Promote when the gated metric improves on the champion by more than `min_delta` and no guard
    metric regresses by more than its bound (`ci95`, the bootstrap interval of new - champion, is
    recorded, not used). Without a champion the bar is the base model on the same rows, and when the
    eval computed intervals (`ci95_vs_base`), the whole interval of the improvement must be above 0:
    a first adapter is promoted only when it is better than no adapter at all. For classification
    the base is an untrained head, i.e. chance. Non-finite values never promote."""
    if champion_metrics is not None:
        return _judge(gate, new_metrics, champion_metrics, "champion", ci95, require_ci=False)
    if base_metrics is None:
        numbers = {"metric": gate.metric, "direction": gate.direction, "compared_with": None}
        return Decision(False, "no champion yet, and no base scores to compare with (eval.compare_base is off): "
                               "a first adapter is promoted only when it beats the base", numbers)
    return _judge(gate, new_metrics, base_metrics, "base", ci95_vs_base, require_ci=True)


def _judge(gate: GateSection, new_metrics: dict[str, Any], other_metrics: dict[str, Any], who: str,
           ci: list[float] | None, require_ci: bool) -> Decision:
    metric = gate.metric
    new, old = _value(new_metrics, metric, "new adapter's"), _value(other_metrics, metric, f"{who}'s")
    gain = _improvement(new, old, gate.direction)
    numbers: dict[str, Any] = {"metric": metric, "direction": gate.direction, "new": new, "min_delta": gate.min_delta,
                               "compared_with": who, who: old, "delta": new - old, "improvement": gain}
    if ci is not None:
        numbers[f"ci95_new_minus_{who}"] = list(ci)
    if not (math.isfinite(new) and math.isfinite(old)):
        return Decision(False, f"{metric} is not finite (new {new}, {who} {old})", numbers)

    guards, failed = {}, []
    for guard, bound in sorted(gate.guards.items()):
        g_new, g_old = _value(new_metrics, guard, "new adapter's"), _value(other_metrics, guard, f"{who}'s")
        regression = -_improvement(g_new, g_old, metric_direction(guard))
        ok = math.isfinite(regression) and regression <= bound
        guards[guard] = {"new": g_new, who: g_old, "regression": regression, "bound": bound, "ok": ok}
        if not ok:
            failed.append(f"{guard} regressed by {regression:.6g} > {bound:g}")
    numbers["guards"] = guards

    versus = f"{metric} {new:.6g} vs {who} {old:.6g}"
    if gain <= gate.min_delta:
        return Decision(False, f"{versus}: improvement {gain:.6g} is not above min_delta {gate.min_delta:g}", numbers)
    if require_ci and ci is not None:
        worst = ci[0] if gate.direction == "max" else -ci[1]  # the least favourable end, as an improvement
        if not worst > 0:
            return Decision(False, f"{versus}: improved by {gain:.6g}, but the 95% interval of the difference "
                                   f"{[round(c, 6) for c in ci]} does not exclude no improvement", numbers)
    if failed:
        return Decision(False, f"{metric} improved by {gain:.6g} but guard failed: " + "; ".join(failed), numbers)
    return Decision(True, f"{versus}: improved by {gain:.6g} (> min_delta {gate.min_delta:g})", numbers)
