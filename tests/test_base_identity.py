"""The base model is a cache key: its weights' content is an input of prepare, train and evaluate,
and every stage loads the model and tokenizer at `model.revision`."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from workflows.artifacts import stage_output
from workflows.config import config_from_dict
from workflows.dag import plan, save_plan_state


def local_base_config(tmp_path: Path, base: Path, **model):
    return config_from_dict({"model": {"name": str(base), **model},
                             "data": {"source": "rows.jsonl", "format": "instruction"},
                             "cluster": {"work_dir": str(tmp_path / "work"), "runs_dir": str(tmp_path / "runs")}})


def same_data(config) -> str:
    return "d1"


def test_a_base_folder_updated_in_place_misses_prepare_train_and_evaluate(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    weights = base / "model.safetensors"
    weights.write_bytes(b"weights v1")
    first = plan(local_base_config(tmp_path, base), input_digest=same_data)
    for st in first.stages:
        with stage_output(st.dir):
            pass
    save_plan_state(first)
    weights.write_bytes(b"weights v2")  # the same path, other weights
    os.utime(weights, ns=(1, 1))  # whatever the clock: the content is what counts
    again = plan(local_base_config(tmp_path, base), input_digest=same_data)
    assert [s.status for s in again.stages] == ["miss"] * 4
    assert all("base model changed" in s.why for s in again.stages[:3])


def test_an_unchanged_base_keeps_every_stage_a_hit(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"weights")
    first = plan(local_base_config(tmp_path, base), input_digest=same_data)
    for st in first.stages:
        with stage_output(st.dir):
            pass
    assert [s.status for s in plan(local_base_config(tmp_path, base), input_digest=same_data).stages] == ["hit"] * 4


class Loaded(Exception):
    pass


def test_prepare_loads_its_tokenizer_at_the_model_revision(tmp_path, monkeypatch):
    from workflows.prepare import encode, stage

    seen = []

    def load_tokenizer(name, revision=None):
        seen.append(revision)
        raise Loaded

    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n')
    cfg = config_from_dict({"model": {"name": "tiny-llama", "revision": "0123abc"},
                            "data": {"source": str(tmp_path / "rows.jsonl"), "format": "text"}})
    for module in (stage, encode):
        monkeypatch.setattr(module, "load_tokenizer", load_tokenizer)
    with pytest.raises(Loaded):
        stage.run_prepare(cfg, str(tmp_path / "out"))
    with pytest.raises(Loaded):
        encode.EncodeExamples("tiny-llama", cfg.data, "causal_lm", cfg.model.revision)
    assert seen == ["0123abc", "0123abc"]


def test_evaluate_scores_on_the_base_at_the_model_revision(tmp_path):
    from workflows.evaluate.stage import _spec

    cfg = config_from_dict({"model": {"name": "tiny-llama", "revision": "0123abc"},
                            "data": {"source": "rows.jsonl", "format": "text"}})
    spec = _spec(cfg, SimpleNamespace(task="causal_lm", manifest={}), SimpleNamespace(ref="new"), None, ["a"])
    assert spec.revision == "0123abc"
