"""`loraflow tune`: Ray Tune sweeps over lora.* and train.* keys, selected on a validation split.

    prepare (cached; with a tune section it also carves validation/ out of the train rows)
      -> Tune: one trial = one Ray Train run on train (less validation), reporting the evaluate
         stage's metrics on validation every `train.eval_every` steps; successive halving stops
         laggards: Ray Tune's ASHA, or synchronous halving (`tune.halving: sync`, `halving.py`),
         which pauses each trial at a rung until all got there
      -> the best trial that ran its whole budget is committed as the train stage output of its
         config, and the DAG runs on: evaluate scores it ONCE on the eval split, register gates it

No eval row reaches a trial: a trial's data is `PreparedData.for_trials()` (validation in the
place of eval), and its validator reads the validation shards only.

Under Ray Train V2 a trial is a plain Tune function that builds and fits a `TorchTrainer` with a
`TuneReportCallback` (`Tuner(TorchTrainer(...))` is an error in 2.60). The trial function holds
(almost) no CPUs, so its trainer's workers and Ray Data can be placed; `tune.max_concurrent` (or
what the cluster's CPUs fit) bounds the trials running at once (a paused trial holds no slot).

The sweep's name is a fingerprint of what it searches (prepared data, sections, tune section):
running the same command again restores the experiment (`Tuner.restore`): finished trials are
kept, unfinished ones go on from their Ray Train checkpoints. Everything follows the work directory:
Tune's state and each trial's Ray Train run live under `<work_dir>/tune`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from workflows import storage
from workflows.adapters import AdapterFiles
from workflows.artifacts import atomic_write_json, fingerprint
from workflows.config import PipelineConfig, config_from_dict
from workflows.dag import Layout, Plan, plan
from workflows.lease import run_lease
from workflows.pipeline import new_run_id, ray_session, run_pipeline
from workflows.prepared import PreparedData
from workflows.train.stage import build_trainer, commit_run, plan_steps
from workflows.tune.cleanup import release_after_sweep
from workflows.tune.halving import Slots, SyncHalving, rungs
from workflows.tune.report import TrialLines, TrialRecord, trial_records, write_tune_report
from workflows.tune.space import (
    check_space,
    config_with,
    num_samples,
    num_trials,
    param_space,
    search_algorithm,
    trial_config,
)
from workflows.tune.validation import metric_key, trial_validator

__all__ = ["DeliveredReportCallback", "check_space", "commit_best_trial", "config_with", "run_tune", "sweep_storage", "trial_run_dir",
           "tune_then_run"]


def sweep_storage(layout: Layout) -> str:
    """`<work_dir>/tune`: Tune's state, and each trial's Ray Train run under `trials/` (a URI when the
    work directory is an object store, like the train stage's `ray_train`)."""
    return layout.store.uri_of("tune")


def trial_run_dir(storage_path: str, trial_id: str) -> str:
    """Where trial `trial_id` of a sweep stored under `storage_path` keeps its Ray Train run."""
    return storage.join(storage_path, "trials", _trial_run_name(trial_id))


def _trial_run_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def _rows(files: list[str]) -> int:
    return sum(storage.parquet_rows(f) for f in files)


def _trial(params: dict[str, Any], config_dict: dict[str, Any], source_path: str | None, prepared_dir: str,
           storage_path: str, init_adapter: AdapterFiles | None) -> None:
    """One Tune trial = one Ray Train run. Module-level so it pickles by reference.

    `prepared_dir` and `storage_path` (the sweep's `trials/`) are local paths or URIs; a warm-start
    adapter travels as its files.
    """
    base = config_from_dict(config_dict, origin="tune", source_path=source_path)
    cfg = trial_config(base, params)
    trial_id = tune.get_context().get_trial_id()
    run_name = _trial_run_name(trial_id)
    if _replay_finished(storage.join(storage_path, run_name)):
        return
    _quiet_data_progress()
    prepared = PreparedData.load(prepared_dir)
    validator = trial_validator(prepared.manifest, prepared.validation_files, cfg.model.name, cfg.tune.metric,
                                cfg.eval.batch_size, cfg.eval.generation)
    trainer = build_trainer(cfg, prepared.for_trials(), storage_path, run_name, init_adapter=init_adapter,
                            callbacks=[DeliveredReportCallback()], validator=validator,
                            progress_prefix=f"[trial {trial_id}]")
    trainer.fit()


DELIVERY_TIMEOUT_S = 60.0  # how long a report waits for the trial to take it


class DeliveredReportCallback(TuneReportCallback):
    """Ray Tune's `TuneReportCallback`, whose reports reach Tune before `fit()` can return.

    In Ray 2.60 the callback (in the Train controller) puts each report on a one-slot queue that the
    trial's session drains while the trial function runs; a last report still on the queue when
    `fit()` returns is dropped, and Tune records a finished trial at its previous report (seen in the
    suite: a trial whose Ray Train run reached step 4 of 4 recorded at step 2, so it was not among the
    finished trials a sweep chooses from). Here a report returns once the trial has taken it."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        super().after_report(run_context, metrics, checkpoint)
        deadline = time.monotonic() + DELIVERY_TIMEOUT_S
        while not self._training_actor_item_queue.empty() and time.monotonic() < deadline:
            time.sleep(0.05)


def _quiet_data_progress() -> None:
    """No Ray Data progress bars from a trial (its datasets are built in the trial's actor): Ray
    relays a worker's bars to the driver, where the bars of trials running at once garble each
    other in the run log (the console itself strips their cursor moves: `cli.console.shown`)."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def _replay_finished(run_dir: str) -> bool:
    """A trial whose Ray Train run had finished when the driver died (before Tune recorded it) is not
    trained again: its reports are replayed to Tune from the run's metrics.jsonl."""
    import json

    if not storage.exists(storage.join(run_dir, "final", "metrics.json")):
        return False
    for line in (storage.read_text(storage.join(run_dir, "metrics.jsonl")) or "").splitlines():
        if line.strip():
            tune.report(json.loads(line))
    return True


@dataclass
class TuneOutcome:
    best_params: dict[str, Any]
    best_metric: float | None
    best_run_dir: str  # the best trial's Ray Train run: a local path or a URI
    trials: list[TrialRecord]
    metric: str  # the reported key, validation_<metric>
    resumed: bool


def _concurrency(config: PipelineConfig) -> int:
    """`tune.max_concurrent`, or as many trials as the cluster's CPUs fit, two kept for Ray Data."""
    if config.tune.max_concurrent:
        return config.tune.max_concurrent
    import ray

    per_trial = config.train.num_workers * config.train.cpus_per_worker
    return max(1, int((ray.cluster_resources().get("CPU", 0) - 2) // per_trial))


def _scheduler(config: PipelineConfig, budget: int, slots: Slots | None = None):
    """ASHA on the step, or synchronous halving sharing `slots` with the searcher (the Tuner hands
    either the metric and mode)."""
    tc = config.tune
    if not tc.asha:
        return FIFOScheduler()
    grace = tc.grace_period * config.train.eval_every
    if tc.halving == "sync":
        return SyncHalving(num_trials(config), grace, tc.reduction_factor, max(budget, grace), slots or Slots(1))
    # Trials stop themselves at their budget (stop_last_trials=False): ASHA only cuts at its rungs,
    # grace x reduction_factor^k steps.
    return ASHAScheduler(time_attr="step", max_t=max(budget, grace),
                         grace_period=grace, reduction_factor=tc.reduction_factor, stop_last_trials=False)


def run_tune(config: PipelineConfig, prepared_dir: str, storage_path: str, name: str,
             init_adapter: AdapterFiles | None = None, log=print) -> TuneOutcome:
    """Sweep `config.tune` over the prepared data at `prepared_dir`, keeping Tune's state and the
    trials' Ray Train runs under `storage_path` (local paths or URIs). Restores the experiment
    `name` when it exists (a killed driver: the same command goes on)."""
    tc = config.tune
    assert tc is not None, "config has no tune section"
    key = metric_key(tc.metric)
    trial_data = PreparedData.load(prepared_dir).for_trials()
    train_rows = _rows(trial_data.train_files)
    budget = plan_steps(train_rows, config.train)
    trials_dir = storage.join(storage_path, "trials")
    config_dict = config.model_dump(mode="json")
    trainable = tune.with_resources(
        tune.with_parameters(_trial, config_dict=config_dict, source_path=config.source_path,
                             prepared_dir=prepared_dir, storage_path=trials_dir, init_adapter=init_adapter),
        # Next to nothing: the trial only drives its trainer, whose workers (and Ray Data) need the
        # CPUs. Tune refuses an empty request, hence a token fraction rather than 0.
        {"CPU": 0.01})
    where = _tune_storage(storage_path)
    experiment = storage.join(storage_path, name)
    resumed = tune.Tuner.can_restore(experiment, storage_filesystem=where.get("storage_filesystem"))
    if resumed:
        log(f"[tune] resuming sweep {name}: finished trials are kept, unfinished ones go on")
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=where.get("storage_filesystem"))
    else:
        concurrency = _concurrency(config)
        slots = Slots(concurrency) if tc.asha and tc.halving == "sync" else None
        log(f"[tune] sweep {name}: {tc.search} search, {key} ({tc.direction}), up to {concurrency} trial(s) at "
            f"once, {budget} steps each" + (f", {'ASHA' if slots is None else 'synchronous halving'} at steps "
                                            f"{rungs(tc.grace_period * config.train.eval_every, tc.reduction_factor, budget)}"
                                            if tc.asha else ""))
        lines = TrialLines(config_dict, config.source_path, key, train_rows, num_trials(config))
        tuner = tune.Tuner(
            trainable, param_space=param_space(config),
            tune_config=tune.TuneConfig(metric=key, mode=tc.direction, num_samples=num_samples(config),
                                        scheduler=_scheduler(config, budget, slots),
                                        search_alg=search_algorithm(config, concurrency, slots)),
            # A trial that fails (a worker killed for memory on a busy node) is started again up to
            # train.max_failures times; it resumes its Ray Train run from the last checkpoint.
            run_config=tune.RunConfig(name=name, callbacks=[lines],
                                      failure_config=tune.FailureConfig(max_failures=config.train.max_failures),
                                      **where))
    grid = tuner.fit()
    release_after_sweep()  # the last stopped trials' placement groups: evaluate needs those CPUs
    records = trial_records(grid, config, key, train_rows)
    finished = [r for r in records if r.finished and r.metric is not None]
    if not finished:
        errors = "; ".join(f"{r.trial_id}: {r.error}" for r in records if r.error)[:2000]
        raise RuntimeError(f"no trial of sweep {name} ran its whole budget with a {key}"
                           + (f" (errors: {errors})" if errors else ""))
    best = (min if tc.direction == "min" else max)(finished, key=lambda r: r.metric)
    best.best = True
    return TuneOutcome(best.params, best.metric, trial_run_dir(storage_path, best.trial_id), records, key, resumed)


def _tune_storage(storage_path: str) -> dict[str, Any]:
    """`RunConfig` storage arguments: a local path, or for a URI the driver's pyarrow filesystem
    (its endpoint settings then apply on every node, as for the train stage's Ray Train runs)."""
    if not storage.is_uri(storage_path):
        return {"storage_path": storage_path}
    fs, path = storage.resolve(storage_path)
    return {"storage_path": path, "storage_filesystem": fs}


def commit_best_trial(p: Plan, run_dir: str, lease_held: Callable[[], None] = lambda: None) -> None:
    """Commit a finished trial's Ray Train run (`run_dir`) as plan `p`'s train stage output, the way
    the train stage body does: into the local stage directory, then published to the work
    directory's store (for a local work directory that directory is the output; publish does nothing)
    if `lease_held` (the run lease's check) does not raise."""
    st, store = p["train"], p.layout.store
    store.clear_staging(st.name, st.fingerprint)
    commit_run(st.dir, run_dir)
    lease_held()
    store.publish(st.name, st.fingerprint)


def commit_best_trial_leased(config: PipelineConfig, run_dir: str, run_id: str) -> None:
    """`commit_best_trial` for the best config, under the work directory's lease (planned under it:
    another driver may have committed the stage meanwhile), like any stage commit."""
    with run_lease(Layout.of(config).store, run_id, wait=True) as lease_held:
        best_plan = plan(config)
        if best_plan["train"].status != "hit":
            commit_best_trial(best_plan, run_dir, lease_held)


def sweep_name(config: PipelineConfig, prepare_fingerprint: str) -> str:
    """The experiment's name: what it searches, over which data, from which starting config."""
    sections = {s: config.section(s) for s in ("model", "lora", "train", "tune", "eval")}
    return f"tune-{fingerprint('tune', prepare_fingerprint, sections)}"


def tune_then_run(config: PipelineConfig, log=print, run_id: str | None = None) -> dict[str, Any]:
    """Prepare (cached), sweep, commit the best trial as the best config's train output, then run
    the DAG on the best config (as run `run_id`): train is a hit, evaluate and register run."""
    check_space(config)  # before Ray starts: a bad key or value fails here, naming it
    run_id = run_id or new_run_id()
    with ray_session(config, log, start=True):
        run_pipeline(config, until="prepare", log=log, run_id=run_id)  # the same run record as the end
        p = plan(config)
        init = p.adapters.get("init_adapter")
        outcome = run_tune(config, p["prepare"].uri, sweep_storage(p.layout),
                           name=sweep_name(config, p["prepare"].fingerprint),
                           init_adapter=init.files() if init else None, log=log)
        best_config = trial_config(config, outcome.best_params)
        commit_best_trial_leased(best_config, outcome.best_run_dir, run_id)
        manifest = run_pipeline(best_config, log=log, run_id=run_id)
    run_dir = Layout.of(config).runs / run_id
    report = write_tune_report(Path(run_dir), config, outcome, manifest)
    manifest["tune"] = {"best_params": outcome.best_params, "best_metric": outcome.best_metric,
                        "metric": outcome.metric, "resumed": outcome.resumed, **report,
                        "trials": [t.to_dict() for t in outcome.trials]}
    atomic_write_json(run_dir / "manifest.json", manifest)
    log(f"[tune] best trial {next(t.trial_id for t in outcome.trials if t.best)}: {outcome.metric} "
        f"{outcome.best_metric:.4g} on validation; its eval-split score comes from the one evaluation "
        f"after selection; report: {report['report']}")
    return copy.deepcopy(manifest)
