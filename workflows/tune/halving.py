"""Synchronous successive halving (`tune.halving: sync`): every trial reaches a rung before any goes on.

Ray Tune's ASHA (`halving: async`, the default) decides at each rung as a trial arrives there: it goes
on if it is in the top 1/reduction_factor of the trials that got that far *so far*. With few trials
and few at a time, the first trials to reach a rung are compared with almost nobody and go on: with
8 trials one at a time ASHA trains about 2,200 steps of 564-step budgets (3.9 budgets; a simulation of
Ray's rule over random orders), and measured on Banking77 two at a time, 3.8 budgets.

Synchronous halving (Li et al.'s SHA, one bracket of Ray Tune's `HyperBandScheduler` holding every
trial of the sweep) pauses a trial at a rung, frees its slot for the next one, and once every trial
has reached the rung resumes the top ceil(n / reduction_factor) from their Ray Train checkpoints and
stops the rest: 8 trials at reduction factor 3 train 8 x 63 + 3 x 126 + 375 = 1,257 steps of 564
(2.2 budgets), whatever the order.

Pausing needs two things Tune's stock pieces do not give together:
- Concurrency bounded by *running* trials. Tune's `max_concurrent_trials` (and the searchers'
  `max_concurrent`) count a paused trial as live, so with 1 or 2 at a time the sweep would stop
  creating trials at the first pause and wait forever. Here `Slots` is shared by the scheduler (which
  frees a slot on a pause or a stop, and takes one to resume) and the searcher (which creates a trial
  only into a free slot).
- A checkpoint at every rung (`train.checkpoint_every` divides the first rung's step), so a resumed
  trial goes on from where it paused (checked with the config: `check_space`).
"""

from __future__ import annotations

from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import HyperBandScheduler, TrialScheduler
from ray.tune.schedulers.hyperband import _Bracket
from ray.tune.search import BasicVariantGenerator, SearchGenerator


class Slots:
    """The trials holding a slot (running, or created and about to run), at most `size`."""

    def __init__(self, size: int):
        self.size, self.held = size, set()

    def free(self) -> bool:
        return len(self.held) < self.size


def rungs(grace: int, reduction_factor: int, budget: int) -> list[int]:
    """The steps at which trials are compared: grace x reduction_factor^k below the budget."""
    out, step = [], grace
    while step < budget:
        out.append(step)
        step *= reduction_factor
    return out


class _WholeBracket(_Bracket):
    """A bracket that decides a rung only once all `expected` trials are in it (trials are created
    one slot at a time, so the first to reach a rung would otherwise be alone there)."""

    def __init__(self, expected: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.expected = expected

    def cur_iter_done(self) -> bool:
        return len(self._all_trials) >= self.expected and super().cur_iter_done()


class SyncHalving(HyperBandScheduler):
    """One HyperBand bracket of all `num_trials` trials, rungs at `rungs(grace, rf, budget)` steps;
    at most `slots.size` trials run at once. Trials stop themselves at their budget."""

    def __init__(self, num_trials: int, grace: int, reduction_factor: int, budget: int, slots: Slots):
        super().__init__(time_attr="step", max_t=budget, reduction_factor=reduction_factor, stop_last_trials=False)
        self._num_trials, self._grace, self._budget, self.slots = num_trials, grace, budget, slots
        self._processing = False

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        if not self._metric or not self._metric_op:
            raise ValueError("SyncHalving needs the Tuner's metric and mode")
        if self._state["bracket"] is None:
            bracket = _WholeBracket(self._num_trials, time_attr=self._time_attr, max_trials=self._num_trials,
                                    init_t_attr=self._grace, max_t_attr=self._budget, eta=self._eta,
                                    s=len(rungs(self._grace, self._eta, self._budget)), stop_last_trials=False)
            self._hyperbands[0].append(bracket)
            self._state["bracket"] = bracket
        bracket = self._state["bracket"]
        if trial.status in (Trial.TERMINATED, Trial.ERROR):
            bracket.expected -= 1  # a restored sweep's ended trial: not in the race any more
            return
        bracket.add_trial(trial)
        self._trial_info[trial] = bracket, 0
        last = trial.run_metadata.last_result or {}
        if self._metric in last and last.get(self._time_attr, 0) >= bracket._cumul_r:
            # restored after a rung (the driver died while it waited there): it waits again, paused,
            # with that result, instead of training on to its next report first
            bracket.update_trial_stats(trial, last)
            trial.set_status(Trial.PAUSED)
            return
        if self.slots.free():
            self.slots.held.add(trial)
        else:  # a restored unfinished trial, beyond the slots: it waits, paused, for one (set on the
            # trial itself: Tune files the trial under its status after this call)
            trial.set_status(Trial.PAUSED)
            bracket.trials_to_unpause.add(trial)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        if self._metric not in result:  # a training-loss report between validations
            return TrialScheduler.CONTINUE
        action = self._guarded(super().on_trial_result, tune_controller, trial, result)
        if action != TrialScheduler.CONTINUE:
            self.slots.held.discard(trial)
        return action

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        """A trial left (stopped, finished, failed): if the others wait for nobody else at the rung,
        the rung is decided now. (Ray's HyperBand decides on removal only once per bracket.)"""
        self.slots.held.discard(trial)
        if trial not in self._trial_info:
            return
        bracket = self._trial_info[trial][0]
        bracket.cleanup_trial(trial)
        if not self._processing and bracket.current_trials() and bracket.cur_iter_done():
            self._guarded(self._process_bracket, tune_controller, bracket)

    def _guarded(self, decide: Any, *args: Any) -> Any:
        """Run a rung decision; the bad trials it stops come back through `on_trial_remove`, which
        must not decide again meanwhile."""
        self._processing = True
        try:
            return decide(*args)
        finally:
            self._processing = False

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        self.on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self.on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        bracket = self._state["bracket"]
        waiting = bracket.current_trials() if bracket is not None else []
        if waiting and all(t.status == Trial.PAUSED and t not in bracket.trials_to_unpause for t in waiting) \
                and bracket.cur_iter_done():  # all restored at a rung: nobody is left to report and decide it
            self._guarded(self._process_bracket, tune_controller, bracket)
        if not self.slots.free():
            return None
        trial = super().choose_trial_to_run(tune_controller)
        if trial is not None:
            self.slots.held.add(trial)
        return trial

    def debug_string(self) -> str:
        return f"Synchronous successive halving: {len(self.slots.held)}/{self.slots.size} slots held\n" + \
            super().debug_string()


class _Gated:
    """A search algorithm that creates a trial only into a free slot. The slots are the scheduler's
    (shared, in the driver), so they are left out of the searcher's saved state."""

    slots: Slots

    def next_trial(self):
        return super().next_trial() if self.slots.free() else None  # type: ignore[misc]

    def get_state(self) -> dict:
        state = super().get_state()  # type: ignore[misc]
        if isinstance(state, dict):
            state = {k: v for k, v in state.items() if k != "slots"}
        return state

    def set_state(self, state: dict) -> None:
        slots = self.slots
        super().set_state(state)  # type: ignore[misc]
        self.slots = slots


class GatedVariants(_Gated, BasicVariantGenerator):
    """Tune's random and grid variant generator, gated by `slots`."""

    def __init__(self, slots: Slots, **kwargs: Any):
        super().__init__(**kwargs)
        self.slots = slots


class GatedSearch(_Gated, SearchGenerator):
    """A `Searcher` (Optuna's TPE) behind Tune's `SearchGenerator`, gated by `slots`."""

    def __init__(self, searcher: Any, slots: Slots):
        super().__init__(searcher)
        self.slots = slots
