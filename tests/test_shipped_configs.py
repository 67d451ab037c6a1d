"""The example configs a user runs first (`configs/*.yaml`) keep working: each one validates and
plans, and the real-data examples run their whole DAG as shipped, on their real model and data,
cut to a slice (a few rows, one or two steps of the shipped 2 DDP workers) so that a change that breaks a shipped config is
caught here, not by a user. What the full runs learn is measured in bench/results/, not here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from workflows.config import load_config
from workflows.dag import plan
from workflows.pipeline import run_pipeline
from workflows.tune.space import check_space

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

# A slice of each real-data example: what changes is only how much runs, never what.
SLICE = ["data.max_rows=48", "data.max_eval_rows=16", "train.max_steps=2",
         "train.log_every=1", "train.eval_every=null", "train.checkpoint_every=null", "train.eval_batches=1",
         "eval.bootstrap_samples=50"]
SMOKES = {
    # SmolLM2: the costliest smoke (packed 512-token rows on two workers); 8 eval rows, one answer
    "gsm8k.yaml": ["data.max_eval_rows=8", "eval.generation.num_prompts=1", "eval.generation.max_new_tokens=4",
                   "train.max_steps=1"],
    "banking77.yaml": [],
}


def isolated(tmp_path: Path) -> list[str]:
    return [f"cluster.work_dir={tmp_path / 'work'}", f"cluster.runs_dir={tmp_path / 'runs'}",
            f"registry.root={tmp_path / 'registry'}"]


def test_every_shipped_config_has_a_smoke_or_is_covered_elsewhere():
    """demo.yaml runs in test_cli_console; tune configs in the tune tests; the rest are variants of
    these formats whose plan is checked below."""
    names = {p.name for p in CONFIGS}
    assert set(SMOKES) <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_plans_without_ray(path, tmp_path):
    config = load_config(path, isolated(tmp_path))
    p = plan(config)
    assert [st.name for st in p.stages] == ["prepare", "train", "evaluate", "register"]
    assert all(st.fresh for st in p.stages)  # an empty work directory: every stage would run
    if config.tune is not None:  # a sweep's search space and settings, as `loraflow tune` checks them
        check_space(config)


@pytest.mark.train_group
@pytest.mark.parametrize("name", sorted(SMOKES))
def test_a_slice_of_the_shipped_example_runs_end_to_end(name, ray_session, tmp_path):
    config = load_config(REPO / "configs" / name, SLICE + SMOKES[name] + isolated(tmp_path))
    manifest = run_pipeline(config, log=lambda _: None)
    assert [manifest["stages"][s]["status"] for s in ("prepare", "train", "evaluate", "register")] == ["ran"] * 4
    train = manifest["stages"]["train"]["outputs"]["metrics"]
    assert train["steps"] == config.train.max_steps
    # the real base under the shipped 2-worker DDP: only the adapter's bytes are all-reduced
    assert train["allreduce_bytes_per_step_distinct"] == [train["adapter_param_bytes"]] and train["world_size"] == 2
    models = manifest["stages"]["evaluate"]["outputs"]["metrics"]["models"]
    assert models["new"]["rows"] == models["base"]["rows"] > 0
    assert manifest["stages"]["register"]["outputs"]["version"] == 1
