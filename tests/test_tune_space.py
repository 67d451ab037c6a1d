"""A sweep's config, before anything runs: search spaces, LoRA conveniences, the validation split's
fingerprint. No Ray, no training."""

from __future__ import annotations

import pytest
from ray import tune

from workflows.config import ConfigError, config_from_dict
from workflows.prepare.finalize import validation_side
from workflows.tune.space import ATTENTION, check_space, param_space, search_algorithm, trial_config
from workflows.tune.validation import metric_key

BASE = {"model": {"name": "tiny-llama"}, "data": {"source": "rows.jsonl", "format": "instruction"},
        "train": {"eval_every": 4}}


def sweep(**tune_section) -> dict:
    return {**BASE, "tune": {"search_space": {"train.lr": {"loguniform": [1e-4, 1e-3]}}, **tune_section}}


def cfg(raw: dict):
    return config_from_dict(raw, origin="test.yaml")


def test_a_plain_config_keeps_its_prepare_fingerprint_and_a_sweep_adds_the_validation_split():
    assert "validation_fraction" not in cfg(BASE).section("data")
    assert cfg(sweep(validation_fraction=0.2)).section("data")["validation_fraction"] == 0.2


def test_the_validation_split_is_a_stable_seeded_fraction_of_the_example_ids():
    ids = [f"{i:016x}" for i in range(4000)]
    chosen = [i for i in ids if validation_side(i, 0, 0.1)]
    assert 0.08 < len(chosen) / len(ids) < 0.12
    assert chosen == [i for i in ids if validation_side(i, 0, 0.1)]  # stable
    assert chosen != [i for i in ids if validation_side(i, 1, 0.1)]  # seeded
    assert set(chosen) <= {i for i in ids if validation_side(i, 0, 0.2)}  # grows, never reshuffles


def test_alpha_over_r_ties_alpha_to_the_rank_and_target_sets_are_named():
    c = cfg(sweep())
    trial = trial_config(c, {"lora.r": 16, "lora.alpha_over_r": 2, "lora.target_modules": "attention"})
    assert (trial.lora.r, trial.lora.alpha, trial.lora.target_modules) == (16, 32.0, ATTENTION)
    assert trial_config(c, {"lora.target_modules": "all-linear"}).lora.target_modules == "all-linear"
    assert trial.tune == c.tune  # the trial's prepare fingerprint is the sweep's
    assert trial.section("data") == c.section("data")


@pytest.mark.parametrize("space, named", [
    ({"train.lrr": {"choice": [1e-3]}}, "tune.search_space.train.lrr"),
    ({"lora.r": {"choice": [8, 0]}}, "tune.search_space.lora.r: 0"),
    ({"lora.dropout": {"uniform": [0.0, 1.5]}}, "tune.search_space.lora.dropout: 1.5"),
    ({"train.lr": {"loguniform": [0, 1e-3]}}, "tune.search_space.train.lr: loguniform needs low > 0"),
    ({"train.lr": {"uniform": [1e-3, 1e-4]}}, "tune.search_space.train.lr: uniform needs low < high"),
    ({"lora.r": {"randint": [4.5, 8]}}, "tune.search_space.lora.r: randint needs integers"),
    ({"lora.r": {"grid": [4, 8]}}, "tune.search_space.lora.r: {grid: [..]} needs tune.search: grid"),
    ({"data.max_seq_len": {"choice": [64, 128]}}, "tune.search_space.data.max_seq_len: only lora.* and train.*"),
    ({"lora.alpha_over_r": {"choice": [2, -1]}}, "tune.search_space.lora.alpha_over_r: the ratio"),
    ({"lora.target_modules": {"choice": ["attention", 3]}}, "tune.search_space.lora.target_modules: 3"),
])
def test_an_invalid_trial_config_is_refused_before_anything_runs_naming_the_key(space, named):
    with pytest.raises(ConfigError) as e:
        check_space(cfg({**BASE, "tune": {"search_space": space}}))
    assert named in str(e.value)


def test_a_sweep_needs_periodic_validation_and_a_metric_the_task_has():
    no_eval_every = {**sweep(), "train": {}}
    with pytest.raises(ConfigError, match="train.eval_every"):
        check_space(cfg(no_eval_every))
    with pytest.raises(ConfigError, match="tune.metric 'accuracy' is a classification metric"):
        check_space(cfg(sweep(metric="accuracy")))
    with pytest.raises(ConfigError, match="eval.generation.num_prompts > 0"):
        check_space(cfg(sweep(metric="exact_match", mode="max")))
    with pytest.raises(ConfigError, match=r"tune.search_space.train.lr: search: grid needs"):
        check_space(cfg(sweep(search="grid")))


def test_every_distribution_maps_to_ray_tune_and_the_metric_is_the_validation_one():
    c = cfg({**BASE, "tune": {"search_space": {
        "lora.r": {"choice": [4, 8]}, "train.lr": {"loguniform": [1e-4, 1e-3]}, "lora.dropout": {"uniform": [0, 0.1]},
        "train.warmup_steps": {"randint": [0, 5]}, "lora.alpha_over_r": 2}}})
    check_space(c)
    space = param_space(c)
    assert isinstance(space["lora.r"], tune.search.sample.Categorical)
    assert isinstance(space["train.lr"].get_sampler(), tune.search.sample.LogUniform)
    assert isinstance(space["lora.dropout"], tune.search.sample.Float)
    assert isinstance(space["train.warmup_steps"], tune.search.sample.Integer)
    assert space["lora.alpha_over_r"] == 2
    grid = cfg({**BASE, "tune": {"search": "grid", "search_space": {"lora.r": {"choice": [4, 8]}}}})
    assert param_space(grid)["lora.r"] == {"grid_search": [4, 8]}
    assert metric_key("eval_loss") == metric_key("loss") == "validation_loss"
    assert cfg(sweep()).tune.direction == "min" and cfg(sweep(metric="accuracy")).tune.direction == "max"


def test_tpe_is_optunas_sampler_through_ray_tune():
    pytest.importorskip("optuna", reason="optuna is the `tune` extra (in the dev extra, so CI has it)")
    from ray.tune.search.optuna import OptunaSearch

    c = cfg(sweep(search="tpe"))
    check_space(c)
    limited = search_algorithm(c, concurrency=2)
    assert isinstance(limited.searcher, OptunaSearch) and limited.max_concurrent == 2


def test_a_trial_report_returns_only_once_the_trial_has_taken_it(ray_session):
    """The race behind a finished trial recorded at an earlier step: Ray's callback returns with its
    report still on the one-slot queue; ours returns once the trial's side has taken it."""
    import threading
    import time

    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.util.queue import Queue

    from workflows.tune import DeliveredReportCallback

    def callback(callback_class):
        cb = object.__new__(callback_class)  # no Tune session here: only the queue matters
        cb._training_actor_item_queue = Queue(1, actor_options={"num_cpus": 0})
        return cb, cb._training_actor_item_queue

    ray_cb, queue = callback(TuneReportCallback)
    ray_cb.after_report(None, [{"step": 4}], None)  # nobody takes it
    assert queue.get(block=False) == {"step": 4}  # Ray's returned with the last report still queued

    ours, queue = callback(DeliveredReportCallback)
    taken_at: list[float] = []

    def trial_session():  # takes the report a while after it is queued
        while queue.empty():
            time.sleep(0.01)
        time.sleep(0.5)
        queue.get()
        taken_at.append(time.monotonic())

    taker = threading.Thread(target=trial_session)
    taker.start()
    ours.after_report(None, [{"step": 4}], None)
    returned_at = time.monotonic()
    taker.join(timeout=60)
    assert taken_at and returned_at >= taken_at[0] and queue.empty()


def test_synchronous_halving_needs_a_checkpoint_at_every_rung():
    sync = {**sweep(halving="sync"), "train": {"eval_every": 4}}
    with pytest.raises(ConfigError, match=r"train.checkpoint_every: tune.halving sync pauses each trial at step 4 "):
        check_space(cfg(sync))
    with pytest.raises(ConfigError, match=r"set it to 4 or a divisor of it \(got 3\)"):
        check_space(cfg({**sync, "train": {"eval_every": 4, "checkpoint_every": 3}}))
    check_space(cfg({**sync, "train": {"eval_every": 4, "checkpoint_every": 2}}))
    check_space(cfg({**sweep(halving="sync", asha=False), "train": {"eval_every": 4}}))  # no rungs, no pauses


class _Controller:
    """What Ray Tune's controller does for a scheduler's decisions, in the order Tune does it: a
    paused or pending trial stopped by the scheduler is removed from it (`TuneController.stop_trial`)."""

    def __init__(self, scheduler):
        self.scheduler, self.stopped = scheduler, []

    def stop_trial(self, trial):
        self.stopped.append(trial.trial_id)
        self.scheduler.on_trial_remove(self, trial)
        trial.set_status("TERMINATED")


def _halving(num_trials=3, slots=1):
    from workflows.tune.halving import Slots, SyncHalving

    scheduler = SyncHalving(num_trials, grace=2, reduction_factor=3, budget=6, slots=Slots(slots))
    scheduler.set_search_properties("validation_loss", "min")
    return scheduler, _Controller(scheduler)


def _start(scheduler, controller, trial_id):
    from ray.tune.experiment import Trial

    trial = Trial("__fake", trial_id=trial_id, stub=True)
    scheduler.on_trial_add(controller, trial)
    trial.set_status("RUNNING")
    return trial


def test_asha_as_a_config_sets_it_up_stops_a_trial_that_lags_at_the_rung():
    """The default, `halving: async`: Ray Tune's ASHA as `loraflow tune` builds it from a config (its
    rung at grace_period x eval_every steps), against real Tune trials: the first at the rung goes on,
    one behind it stops there, one ahead goes on (tests/test_tune.py shows it in a real sweep)."""
    from ray.tune.schedulers import AsyncHyperBandScheduler
    from ray.tune.schedulers import TrialScheduler as TS

    from workflows.tune import _scheduler

    config = cfg({**sweep(grace_period=1, reduction_factor=2), "train": {"eval_every": 2}})
    scheduler = _scheduler(config, budget=8)
    assert isinstance(scheduler, AsyncHyperBandScheduler) and config.tune.halving == "async"
    scheduler.set_search_properties("validation_loss", "min")
    controller = _Controller(scheduler)
    first, lagging, ahead = (_start(scheduler, controller, t) for t in ("first", "lagging", "ahead"))
    assert scheduler.on_trial_result(controller, first, {"step": 1, "train_loss": 3.0}) == TS.CONTINUE
    assert scheduler.on_trial_result(controller, first, {"step": 2, "validation_loss": 1.0}) == TS.CONTINUE
    assert scheduler.on_trial_result(controller, lagging, {"step": 1, "validation_loss": 9.0}) == TS.CONTINUE
    assert scheduler.on_trial_result(controller, lagging, {"step": 2, "validation_loss": 2.0}) == TS.STOP
    assert scheduler.on_trial_result(controller, ahead, {"step": 2, "validation_loss": 0.5}) == TS.CONTINUE
    assert scheduler.on_trial_result(controller, first, {"step": 4, "validation_loss": 0.9}) == TS.CONTINUE


def test_synchronous_halving_pauses_every_trial_at_the_rung_until_all_arrived_then_keeps_the_top_third():
    from ray.tune.schedulers import TrialScheduler as TS

    from workflows.tune.halving import rungs

    assert rungs(63, 3, 564) == [63, 189] and rungs(2, 3, 4) == [2] and rungs(8, 2, 8) == []
    scheduler, controller = _halving()
    a = _start(scheduler, controller, "a")
    assert scheduler.on_trial_result(controller, a, {"step": 1, "train_loss": 3.0}) == TS.CONTINUE  # no metric
    # alone at the rung: the other two trials are not even created yet; it waits, paused
    assert scheduler.on_trial_result(controller, a, {"step": 2, "validation_loss": 1.0}) == TS.PAUSE
    a.set_status("PAUSED")
    assert scheduler.slots.free() and scheduler.choose_trial_to_run(controller) is None
    b = _start(scheduler, controller, "b")
    assert not scheduler.slots.free()  # one slot: b holds it
    assert scheduler.on_trial_result(controller, b, {"step": 2, "validation_loss": 0.5}) == TS.PAUSE
    b.set_status("PAUSED")
    c = _start(scheduler, controller, "c")
    # the last to arrive decides the rung: ceil(3 / 3) = 1 goes on (b, the lowest loss); a and c stop
    assert scheduler.on_trial_result(controller, c, {"step": 2, "validation_loss": 2.0}) == TS.STOP
    assert controller.stopped == ["a"]
    scheduler.on_trial_complete(controller, c, {})
    assert scheduler.choose_trial_to_run(controller) is b and not scheduler.slots.free()
    b.set_status("RUNNING")
    assert scheduler.on_trial_result(controller, b, {"step": 4, "validation_loss": 0.4}) == TS.CONTINUE  # last rung


def test_a_trial_that_fails_before_the_rung_does_not_leave_the_others_waiting_for_it():
    from ray.tune.schedulers import TrialScheduler as TS

    scheduler, controller = _halving()
    trials = []
    for trial_id, loss in (("a", 1.0), ("b", 0.5)):
        trial = _start(scheduler, controller, trial_id)
        assert scheduler.on_trial_result(controller, trial, {"step": 2, "validation_loss": loss}) == TS.PAUSE
        trial.set_status("PAUSED")
        trials.append(trial)
    c = _start(scheduler, controller, "c")
    c.set_status("ERROR")
    scheduler.on_trial_error(controller, c)  # the last trial dies before the rung: decided without it
    assert controller.stopped == ["a"] and scheduler.choose_trial_to_run(controller) is trials[1]


def _restored(scheduler, controller, trial_id, status="PENDING", last=None):
    """A trial as `Tuner.restore` hands it to the scheduler (unfinished ones come back PENDING)."""
    from ray.tune.experiment import Trial

    trial = Trial("__fake", trial_id=trial_id, stub=True)
    trial.set_status(status)
    if last:
        trial.run_metadata.last_result = last
    scheduler.on_trial_add(controller, trial)
    return trial


def test_a_restored_sweep_races_only_its_unfinished_trials_and_those_at_the_rung_wait_there():
    from ray.tune.schedulers import TrialScheduler as TS

    scheduler, controller = _halving()
    _restored(scheduler, controller, "a", status="TERMINATED")  # ended before the driver died: out
    b = _restored(scheduler, controller, "b", last={"step": 2, "validation_loss": 0.5})  # was paused there
    c = _restored(scheduler, controller, "c")  # had not reached the rung
    assert (b.status, c.status) == ("PAUSED", "PENDING")  # b does not train on to step 4 first
    assert scheduler.choose_trial_to_run(controller) is None  # c holds the one slot
    c.set_status("RUNNING")
    # both unfinished trials at the rung: decided without the ended one; ceil(3 / 3) = 1 goes on
    assert scheduler.on_trial_result(controller, c, {"step": 2, "validation_loss": 0.9}) == TS.STOP
    scheduler.on_trial_complete(controller, c, {})
    assert scheduler.choose_trial_to_run(controller) is b


def test_a_sweep_restored_with_every_trial_at_the_rung_decides_it_without_a_report():
    scheduler, controller = _halving()
    for trial_id, loss in (("a", 1.0), ("b", 0.5), ("c", 2.0)):
        _restored(scheduler, controller, trial_id, last={"step": 2, "validation_loss": loss})
    chosen = scheduler.choose_trial_to_run(controller)
    assert chosen.trial_id == "b" and sorted(controller.stopped) == ["a", "c"]
