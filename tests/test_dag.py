"""The DAG's cache decisions: fingerprints, hits, misses and why (no stage runs here)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from workflows import dag, pipeline
from workflows.artifacts import stage_output
from workflows.config import config_from_dict
from workflows.dag import STAGE, STAGE_NAMES, STAGES, plan, save_plan_state
from workflows.prepare import inputs as prepare_inputs
from workflows.registry.sqlite import Registry


def make_config(tmp_path: Path, **train):
    return config_from_dict({"data": {"source": "rows.jsonl", "format": "instruction"},
                             "train": {"lr": 1e-3, **train},
                             "cluster": {"work_dir": str(tmp_path / "work"), "runs_dir": str(tmp_path / "runs")}})


def digest(value: str):
    return lambda config: value


def complete_everything(p) -> None:
    for st in p.stages:
        with stage_output(st.dir):
            pass
    save_plan_state(p)


def test_graph_is_declared_in_order():
    assert STAGE_NAMES == ("prepare", "train", "evaluate", "register")


def test_fresh_work_dir_misses_every_stage(tmp_path):
    p = plan(make_config(tmp_path), input_digest=digest("d1"))
    assert [s.status for s in p.stages] == ["miss"] * 4
    assert all("never ran" in s.why for s in p.stages)


def test_nothing_changed_hits_every_stage(tmp_path):
    complete_everything(plan(make_config(tmp_path), input_digest=digest("d1")))
    p = plan(make_config(tmp_path), input_digest=digest("d1"))
    assert [s.status for s in p.stages] == ["hit"] * 4


def test_changed_lr_reruns_train_and_downstream_but_not_prepare(tmp_path):
    complete_everything(plan(make_config(tmp_path), input_digest=digest("d1")))
    p = plan(make_config(tmp_path, lr=1e-4), input_digest=digest("d1"))
    assert [s.status for s in p.stages] == ["hit", "miss", "miss", "miss"]
    assert p["train"].why == "`train` section changed"
    assert "train upstream changed" in p["evaluate"].why


def test_changed_data_reruns_everything(tmp_path):
    complete_everything(plan(make_config(tmp_path), input_digest=digest("d1")))
    p = plan(make_config(tmp_path), input_digest=digest("d2"))
    assert [s.status for s in p.stages] == ["miss"] * 4
    assert p["prepare"].why == "input data changed"


def test_from_forces_that_stage_and_downstream(tmp_path):
    complete_everything(plan(make_config(tmp_path), input_digest=digest("d1")))
    p = plan(make_config(tmp_path), force_from="evaluate", input_digest=digest("d1"))
    assert [s.status for s in p.stages] == ["hit", "hit", "forced", "forced"]


def test_from_unknown_stage_is_refused(tmp_path):
    with pytest.raises(ValueError, match="choose one of prepare, train, evaluate, register"):
        plan(make_config(tmp_path), force_from="deploy", input_digest=digest("d1"))


def test_stage_dir_without_success_marker_is_a_miss(tmp_path):
    p = plan(make_config(tmp_path), input_digest=digest("d1"))
    p["prepare"].dir.mkdir(parents=True)  # a crashed attempt left a folder behind
    (p["prepare"].dir / "manifest.json").write_text("{}")
    assert plan(make_config(tmp_path), input_digest=digest("d1"))["prepare"].status == "miss"


def test_fingerprints_ignore_sections_a_stage_does_not_read(tmp_path):
    a = plan(make_config(tmp_path), input_digest=digest("d1"))
    b = plan(make_config(tmp_path, lr=5e-5), input_digest=digest("d1"))
    assert a["prepare"].fingerprint == b["prepare"].fingerprint
    assert a["train"].fingerprint != b["train"].fingerprint


# -- references that move: pinned to a registry version and its content before fingerprinting --------

def write_adapter(path: Path, seed: int) -> Path:
    """A small PEFT-format LoRA adapter (distinct content per seed)."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    tensors = {f"base_model.model.model.layers.0.self_attn.q_proj.lora_{k}.weight":
               rng.standard_normal(shape, dtype=np.float32) for k, shape in (("A", (4, 16)), ("B", (16, 4)))}
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    return path


def registry_config(tmp_path: Path, **train):
    cfg = make_config(tmp_path, **train)
    cfg.registry.root, cfg.registry.name = str(tmp_path / "registry"), "demo"
    return cfg


def two_versions(tmp_path: Path) -> Registry:
    registry = Registry(tmp_path / "registry")
    for seed in (1, 2):
        registry.register(write_adapter(tmp_path / f"adapter-{seed}", seed), "demo")
    registry.promote("demo", 1, "champion", reason="test setup")
    return registry


def test_a_promotion_reruns_evaluate_and_register_but_not_train(tmp_path):
    registry = two_versions(tmp_path)
    first = plan(registry_config(tmp_path), input_digest=digest("d1"))
    assert first["evaluate"].components["champion"].startswith("demo:1#")
    complete_everything(first)
    registry.promote("demo", 2, "champion", reason="a later run won")
    p = plan(registry_config(tmp_path), input_digest=digest("d1"))
    assert [s.status for s in p.stages] == ["hit", "hit", "miss", "miss"]
    assert p["evaluate"].why == "champion changed"
    assert p.adapters["champion"].ref == "demo:2"


def test_a_warm_start_from_an_alias_reruns_train_when_the_alias_moves(tmp_path):
    registry = two_versions(tmp_path)
    first = plan(registry_config(tmp_path, init_adapter="demo@champion"), input_digest=digest("d1"))
    assert first.adapters["init_adapter"].ref == "demo:1"
    complete_everything(first)
    registry.promote("demo", 2, "champion", reason="a later run won")
    p = plan(registry_config(tmp_path, init_adapter="demo@champion"), input_digest=digest("d1"))
    assert [s.status for s in p.stages] == ["hit", "miss", "miss", "miss"]
    assert p["train"].why.startswith("warm-start adapter changed")
    assert p.adapters["init_adapter"].ref == "demo:2"


def test_after_its_own_promotion_a_rerun_with_nothing_changed_hits_every_stage(tmp_path):
    """The champion that evaluation compared against stays the comparison once this plan's own
    adapter is promoted over it (it would otherwise be compared against itself, forever)."""
    registry = two_versions(tmp_path)
    first = plan(registry_config(tmp_path), input_digest=digest("d1"))
    complete_everything(first)
    ours = registry.register(write_adapter(tmp_path / "ours", 3), "demo",
                             lineage={"fingerprints": {s.name: s.fingerprint for s in first.stages}})
    registry.promote("demo", ours, "champion", reason="the gate promoted this run's adapter")
    p = plan(registry_config(tmp_path), input_digest=digest("d1"))
    assert [s.status for s in p.stages] == ["hit"] * 4
    assert p.adapters["champion"].ref == "demo:1"


def test_register_declares_every_stage_it_reads(tmp_path):
    """The register body reads prepare's digests for the lineage: prepare is declared upstream, so
    its fingerprint feeds register's and the pipeline hands its outputs over."""
    assert STAGE["register"].upstream == ("prepare", "train", "evaluate")
    p = plan(make_config(tmp_path), input_digest=digest("d1"))
    assert p["register"].components["upstream:prepare"] == p["prepare"].fingerprint


def test_a_body_is_handed_only_its_declared_upstream_outputs(tmp_path, monkeypatch):
    """Every body gets a mapping of exactly its upstream stages' outputs (nothing else to read)."""
    seen = {}

    def recording(name):
        def body(run):
            seen[name] = sorted(run.inputs)
            return {"dir": run.stage.uri}
        return body

    stages = tuple(dataclasses.replace(s, body=recording(s.name), needs_ray=False) for s in STAGES)
    monkeypatch.setattr(dag, "STAGES", stages)
    monkeypatch.setattr(dag, "STAGE", {s.name: s for s in stages})
    monkeypatch.setattr(pipeline, "STAGE", {s.name: s for s in stages})
    monkeypatch.setattr(prepare_inputs, "input_digest", digest("d1"))
    manifest = pipeline.run_pipeline(make_config(tmp_path), log=lambda _: None)
    assert seen == {s.name: sorted(s.upstream) for s in STAGES}
    assert not manifest["ray_started"]
