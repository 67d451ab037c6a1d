"""What a sweep writes into its run directory, from trial records (no Ray, no training)."""

from __future__ import annotations

from types import SimpleNamespace

from workflows.config import config_from_dict
from workflows.tune.report import TrialRecord, write_tune_report

CONFIG = {"model": {"name": "tiny-llama"}, "data": {"source": "rows.jsonl", "format": "instruction"},
          "train": {"eval_every": 10, "max_steps": 30},
          "tune": {"search_space": {"lora.r": {"choice": [4, 8]}, "train.lr": {"loguniform": [1e-4, 1e-2]}}}}


def record(trial_id: str, r: int, lr: float, losses: list[float], budget: int = 30, **kw) -> TrialRecord:
    history = [(10 * (i + 1), v) for i, v in enumerate(losses)]
    return TrialRecord(trial_id=trial_id, params={"lora.r": r, "train.lr": lr}, rank=r, lr=lr, metric=losses[-1],
                       steps=history[-1][0], budget=budget, seconds=2.0 * history[-1][0], history=history,
                       scalars={"validation_loss": history}, **kw)


def test_the_report_lists_every_trial_what_asha_saved_and_the_one_eval_score(tmp_path):
    trials = [record("a_00000", 4, 1e-3, [2.0, 1.5, 1.2], best=True), record("a_00001", 8, 1e-2, [2.5, 2.4]),
              record("a_00002", 8, 1e-4, [3.0])]
    outcome = SimpleNamespace(metric="validation_loss", trials=trials)
    manifest = {"stages": {"evaluate": {"outputs": {"metrics": {"models": {"new": {"loss": 1.25, "rows": 40}}}}},
                           "prepare": {"outputs": {"counts": {"validation_rows": 20}}}}}
    out = write_tune_report(tmp_path, config_from_dict(CONFIG), outcome, manifest)
    text = (tmp_path / "tune.md").read_text()
    assert "| a_00000 **(chosen)** | 4 | 0.001 | 1.2 | 30/30 | 60 | no |" in text
    assert "| a_00001 | 8 | 0.01 | 2.4 | 20/30 | 40 | yes |" in text and "| a_00002 | 8 | 0.0001 | 3 | 10/30 | 20 | yes |" in text
    assert "Steps run: 60 of 90 planned (33% saved by early stopping; at the trials' mean 2.00 s per step, " \
           "about 1.0 min of training)" in text
    assert "scored once on the eval split" in text and "loss 1.25 on 40 rows" in text
    assert out["steps_run"] == 60 and out["eval_score"]["loss"] == 1.25
    for picture in out["pictures"]:
        assert open(picture, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert all(list((tmp_path / "tensorboard" / "tune" / t.trial_id).glob("events.out.tfevents.*")) for t in trials)


def test_a_paused_and_resumed_trial_s_training_time_sums_its_attempts():
    from workflows.tune.report import _train_seconds

    # Tune's rows of a trial paused at step 63 and resumed from its checkpoint there (a new Ray Train
    # attempt: elapsed_s and steps_this_run start again), then at 189 once more
    rows = [{"step": 63, "steps_this_run": 63, "elapsed_s": 44.0}, {"step": 126, "steps_this_run": 63, "elapsed_s": 40.0},
            {"step": 189, "steps_this_run": 126, "elapsed_s": 86.0}, {"step": 252, "steps_this_run": 63, "elapsed_s": 42.0},
            {"step": 564, "steps_this_run": 375, "elapsed_s": 269.0}]
    assert _train_seconds(rows) == 44.0 + 86.0 + 269.0
    assert _train_seconds(rows[:1] + [{"step": 126, "steps_this_run": 126, "elapsed_s": 90.0}]) == 90.0  # one attempt
    assert _train_seconds([{"step": 2, "train_loss": 1.0}]) is None
