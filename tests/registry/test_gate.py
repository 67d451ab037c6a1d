"""The promotion gate: `decide` on metric dicts, and `register_and_gate` against a real registry."""

from __future__ import annotations

import math

import pytest
from test_registry_sqlite import write_peft_adapter

from workflows.config import GateSection, config_from_dict
from workflows.registry.gate import GateError, decide
from workflows.registry.sqlite import Registry
from workflows.registry.stage import register_and_gate


def test_promotes_when_the_metric_improves_by_more_than_min_delta():
    d = decide(GateSection(metric="loss", direction="min", min_delta=0.1), {"loss": 1.0}, {"loss": 1.2})
    assert d.promote
    assert d.numbers["improvement"] == pytest.approx(0.2)
    assert d.numbers["champion"] == 1.2


def test_an_improvement_equal_to_min_delta_does_not_promote():
    d = decide(GateSection(metric="loss", min_delta=0.25), {"loss": 1.0}, {"loss": 1.25})
    assert not d.promote
    assert "not above min_delta" in d.reason


def test_a_tie_does_not_promote_with_zero_min_delta():
    assert not decide(GateSection(metric="loss"), {"loss": 1.0}, {"loss": 1.0}).promote


def test_direction_max_promotes_on_a_higher_value():
    gate = GateSection(metric="exact_match", direction="max")
    assert decide(gate, {"exact_match": 0.6}, {"exact_match": 0.5}).promote
    assert not decide(gate, {"exact_match": 0.4}, {"exact_match": 0.5}).promote


def test_a_guard_regressing_beyond_its_bound_blocks_promotion():
    gate = GateSection(metric="loss", guards={"token_accuracy": 0.01})
    d = decide(gate, {"loss": 0.9, "token_accuracy": 0.70}, {"loss": 1.0, "token_accuracy": 0.75})
    assert not d.promote
    assert "token_accuracy regressed" in d.reason
    assert d.numbers["guards"]["token_accuracy"]["regression"] == pytest.approx(0.05)


def test_a_guard_within_its_bound_lets_promotion_through():
    gate = GateSection(metric="loss", guards={"token_accuracy": 0.01, "perplexity": 0.5})
    d = decide(gate, {"loss": 0.9, "token_accuracy": 0.745, "perplexity": 2.6},
               {"loss": 1.0, "token_accuracy": 0.75, "perplexity": 2.4})
    assert d.promote
    assert all(g["ok"] for g in d.numbers["guards"].values())


def test_without_a_champion_the_first_adapter_must_beat_the_base():
    gate = GateSection(metric="accuracy", direction="max", min_delta=0.01)
    d = decide(gate, {"accuracy": 0.9}, None, base_metrics={"accuracy": 0.013})
    assert d.promote and d.numbers["compared_with"] == "base" and d.numbers["base"] == 0.013
    d = decide(gate, {"accuracy": 0.013}, None, base_metrics={"accuracy": 0.013})
    assert not d.promote and "accuracy 0.013 vs base 0.013" in d.reason  # a chance-level adapter


def test_a_first_adapter_whose_interval_includes_no_gain_is_not_promoted():
    gate = GateSection(metric="loss")
    d = decide(gate, {"loss": 1.9}, None, base_metrics={"loss": 2.0}, ci95_vs_base=[-0.3, 0.05])
    assert not d.promote and "does not exclude no improvement" in d.reason
    assert decide(gate, {"loss": 1.9}, None, base_metrics={"loss": 2.0}, ci95_vs_base=[-0.3, -0.02]).promote


def test_without_a_champion_or_base_scores_nothing_is_promoted():
    d = decide(GateSection(), {"loss": 0.1}, None)
    assert not d.promote and "eval.compare_base is off" in d.reason


def test_a_missing_metric_names_it_and_the_available_ones():
    with pytest.raises(GateError, match=r"'macro_f1' not in the new adapter's metrics \(available: \['loss'\]\)"):
        decide(GateSection(metric="macro_f1"), {"loss": 1.0}, {"loss": 2.0})


def test_a_guard_with_unknown_direction_is_refused():
    with pytest.raises(GateError, match="'bleu_score': unknown direction"):
        decide(GateSection(guards={"bleu_score": 0.1}), {"loss": 1.0, "bleu_score": 1}, {"loss": 2.0, "bleu_score": 1})


def test_a_non_finite_metric_never_promotes():
    assert not decide(GateSection(), {"loss": math.nan}, {"loss": 1.0}).promote


# -- register_and_gate on a real registry -------------------------------------------------------

def _config(root, **gate):
    return config_from_dict({"data": {"source": "x.jsonl", "format": "text"},
                             "registry": {"root": str(root), "name": "demo", "gate": gate}})


def _eval(new_loss, champion_loss=None, champion_ref=None, base_loss=5.0):
    models = {"base": {"loss": base_loss}, "new": {"loss": new_loss}}
    out = {"models": models, "diff": {}, "rows": 10}
    if champion_ref:
        models["champion"] = {"loss": champion_loss}
        out["champion_ref"] = champion_ref
        out["diff"]["loss"] = {"new_minus_champion": new_loss - champion_loss, "ci95": [-0.2, -0.1]}
    return out


@pytest.fixture
def setup(tmp_path):
    cfg = _config(tmp_path / "registry")
    return cfg, Registry(cfg.registry.root), [write_peft_adapter(tmp_path / f"a{i}", seed=i) for i in range(3)]


def test_the_first_adapter_becomes_champion(setup):
    cfg, reg, adapters = setup
    version, decision = register_and_gate(cfg, adapters[0], _eval(2.0), {"run_id": "r1"})
    assert (version, decision.promote, reg.alias_version("demo", "champion")) == (1, True, 1)
    assert reg.get("demo:1").metrics == {"loss": 2.0}
    assert reg.get("demo:1").lineage["run_id"] == "r1"


def test_a_first_adapter_no_better_than_the_base_is_registered_but_not_promoted(setup):
    cfg, reg, adapters = setup
    version, decision = register_and_gate(cfg, adapters[0], _eval(4.4, base_loss=4.4), {})
    assert version == 1 and not decision.promote and reg.alias_version("demo", "champion") is None
    assert reg.decisions("demo", 1)[0]["numbers"]["base"] == 4.4


def test_a_better_adapter_takes_over_with_the_numbers_recorded(setup):
    cfg, reg, adapters = setup
    register_and_gate(cfg, adapters[0], _eval(2.0), {})
    version, decision = register_and_gate(cfg, adapters[1], _eval(1.5, 2.0, "demo:1"), {})
    assert decision.promote and reg.alias_version("demo", "champion") == version == 2
    move = reg.history("demo", "champion")[-1]
    assert (move.from_version, move.to_version) == (1, 2)
    assert move.numbers["improvement"] == pytest.approx(0.5)
    assert move.numbers["ci95_new_minus_champion"] == [-0.2, -0.1]


def test_a_worse_adapter_is_registered_but_champion_stays(setup):
    cfg, reg, adapters = setup
    register_and_gate(cfg, adapters[0], _eval(2.0), {})
    version, decision = register_and_gate(cfg, adapters[1], _eval(2.5, 2.0, "demo:1"), {})
    assert version == 2 and not decision.promote
    assert reg.alias_version("demo", "champion") == 1
    recorded = reg.decisions("demo", 2)
    assert len(recorded) == 1 and not recorded[0]["promote"]
    assert recorded[0]["numbers"]["new"] == 2.5 and recorded[0]["numbers"]["champion"] == 2.0


def test_a_retried_register_stage_changes_nothing(setup):
    cfg, reg, adapters = setup
    register_and_gate(cfg, adapters[0], _eval(2.0), {})
    again, decision = register_and_gate(cfg, adapters[0], _eval(2.0), {})
    assert again == 1 and decision.promote
    assert len(reg.history("demo", "champion")) == 1 and len(reg.decisions("demo")) == 1


def test_an_evaluation_against_a_former_champion_does_not_promote(setup):
    cfg, reg, adapters = setup
    register_and_gate(cfg, adapters[0], _eval(2.0), {})
    reg.register(adapters[1], "demo")
    reg.promote("demo", 2, "champion", "manual")
    # Evaluated against demo:1, but demo:2 is champion now: the numbers do not apply.
    version, decision = register_and_gate(cfg, adapters[2], _eval(0.1, 2.0, "demo:1"), {})
    assert not decision.promote and "evaluate again" in decision.reason
    assert reg.alias_version("demo", "champion") == 2
