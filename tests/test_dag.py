"""The DAG's cache decisions: fingerprints, hits, misses and why (no stage runs here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from workflows.artifacts import stage_output
from workflows.config import config_from_dict
from workflows.dag import STAGE_NAMES, plan, save_plan_state


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
