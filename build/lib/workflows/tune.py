"""`loraflow tune`: Ray Tune sweeps over any config key, with ASHA early stopping on eval loss.

Under Ray Train V2 a trial is a plain Tune function that builds and fits a `TorchTrainer` with a
`TuneReportCallback` (`Tuner(TorchTrainer(...))` is an error in 2.60). The trial function itself
holds (almost) no CPUs, so its trainer's workers and Ray Data can be placed. ASHA acts on the eval loss the
train stage reports every `train.eval_every` steps.

The best trial's Ray Train run is committed as the train stage output of the best config, so the
DAG then sees train as a cache hit and only evaluates and registers it, like any other run.

Everything follows the work directory, as the train stage does: trials read the prepare output
where it is committed, Tune's state and each trial's Ray Train run live under `<work_dir>/tune`,
and on an object store the committed train output is published there (`workflows.storage`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from workflows import storage
from workflows.adapters import AdapterFiles
from workflows.config import PipelineConfig, apply_overrides, config_from_dict
from workflows.dag import Layout, Plan, plan
from workflows.pipeline import ray_session, run_pipeline
from workflows.prepared import PreparedData
from workflows.train.stage import build_trainer, commit_run

_TUNE_RESULT_KEYS = ("eval_loss", "loss", "step", "tokens_per_s")


def _distribution(spec: dict[str, list[Any]]):
    (kind, args), = spec.items()
    if kind == "choice":
        return tune.choice(args)
    if kind == "grid":
        return tune.grid_search(args)
    if kind == "uniform":
        return tune.uniform(*args)
    if kind == "loguniform":
        return tune.loguniform(*args)
    return tune.randint(*args)


def config_with(config: PipelineConfig, params: dict[str, Any]) -> PipelineConfig:
    """The pipeline config with a trial's parameters (dotted keys) applied, validated again."""
    raw = config.model_dump(mode="json", exclude={"tune"})
    raw = apply_overrides(raw, [f"{k}={_yaml_scalar(v)}" for k, v in params.items()])
    cfg = config_from_dict(raw, origin="tune trial", source_path=config.source_path)
    return cfg


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def sweep_storage(layout: Layout) -> str:
    """`<work_dir>/tune`: Tune's state, and each trial's Ray Train run under `trials/` (a URI when the
    work directory is an object store, like the train stage's `ray_train`)."""
    return layout.store.uri_of("tune")


def trial_run_dir(storage_path: str, trial_id: str) -> str:
    """Where trial `trial_id` of a sweep stored under `storage_path` keeps its Ray Train run."""
    return storage.join(storage_path, "trials", _trial_run_name(trial_id))


def _trial_run_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def _trial(params: dict[str, Any], config_dict: dict[str, Any], source_path: str | None, prepared_dir: str,
           storage_path: str, init_adapter: AdapterFiles | None) -> None:
    """One Tune trial = one Ray Train run. Module-level so it pickles by reference.

    `prepared_dir` and `storage_path` (the sweep's `trials/`) are local paths or URIs; a warm-start
    adapter travels as its files.
    """
    base = config_from_dict(config_dict, origin="tune", source_path=source_path)
    cfg = config_with(base, params)
    run_name = _trial_run_name(tune.get_context().get_trial_id())
    trainer = build_trainer(cfg, PreparedData.load(prepared_dir), storage_path, run_name,
                            init_adapter=init_adapter, callbacks=[TuneReportCallback()])
    trainer.fit()


@dataclass
class TuneOutcome:
    best_params: dict[str, Any]
    best_metric: float | None
    best_run_dir: str  # the best trial's Ray Train run: a local path or a URI
    trials: list[dict[str, Any]]


def run_tune(config: PipelineConfig, prepared_dir: str, storage_path: str, name: str,
             init_adapter: AdapterFiles | None = None) -> TuneOutcome:
    """Sweep `config.tune` over the prepared data at `prepared_dir`, keeping Tune's state and the
    trials' Ray Train runs under `storage_path` (local paths or URIs)."""
    tc = config.tune
    assert tc is not None, "config has no tune section"
    space = {key: _distribution(spec) for key, spec in tc.search_space.items()}
    scheduler = (ASHAScheduler(time_attr="training_iteration", grace_period=tc.grace_period,
                               reduction_factor=tc.reduction_factor)
                 if tc.asha else FIFOScheduler())
    trainable = tune.with_resources(
        tune.with_parameters(_trial, config_dict=config.model_dump(mode="json", exclude={"tune"}),
                             source_path=config.source_path, prepared_dir=prepared_dir,
                             storage_path=storage.join(storage_path, "trials"), init_adapter=init_adapter),
        # Next to nothing: the trial only drives its trainer, whose workers (and Ray Data) need the
        # CPUs. Tune refuses an empty request, hence a token fraction rather than 0.
        {"CPU": 0.01})
    has_grid = any("grid" in spec for spec in tc.search_space.values())
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=tc.metric, mode=tc.mode, num_samples=1 if has_grid else tc.num_trials,
                                    max_concurrent_trials=tc.max_concurrent, scheduler=scheduler),
        run_config=tune.RunConfig(name=name, **_tune_storage(storage_path)))
    grid = tuner.fit()
    trials = []
    for result in grid:
        row = {"trial": Path(result.path).name, **{k: result.config[k] for k in tc.search_space},
               **{k: (result.metrics or {}).get(k) for k in _TUNE_RESULT_KEYS},
               "error": str(result.error)[:200] if result.error else None}
        trials.append(row)
    best = grid.get_best_result(metric=tc.metric, mode=tc.mode, scope="all")
    params = {k: best.config[k] for k in tc.search_space}
    best_metric = best.metrics.get(tc.metric) if best.metrics else None
    return TuneOutcome(params, best_metric, trial_run_dir(storage_path, best.metrics["trial_id"]), trials)


def _tune_storage(storage_path: str) -> dict[str, Any]:
    """`RunConfig` storage arguments: a local path, or for a URI the driver's pyarrow filesystem
    (its endpoint settings then apply on every node, as for the train stage's Ray Train runs)."""
    if not storage.is_uri(storage_path):
        return {"storage_path": storage_path}
    fs, path = storage.resolve(storage_path)
    return {"storage_path": path, "storage_filesystem": fs}


def commit_best_trial(p: Plan, run_dir: str) -> None:
    """Commit a finished trial's Ray Train run (`run_dir`) as plan `p`'s train stage output, the way
    the train stage body does: into the local stage directory, then published to the work
    directory's store (for a local work directory that directory is the output; publish does nothing)."""
    st, store = p["train"], p.layout.store
    store.clear_staging(st.name, st.fingerprint)
    commit_run(st.dir, run_dir)
    store.publish(st.name, st.fingerprint)


def tune_then_run(config: PipelineConfig, log=print, run_id: str | None = None) -> dict[str, Any]:
    """Prepare (cached), sweep, commit the best trial as the best config's train output, then run
    the DAG on the best config (as run `run_id`): train is a hit, evaluate and register run."""
    with ray_session(config, log, start=True):
        run_pipeline(config, until="prepare", log=log)
        p = plan(config)
        init = p.adapters.get("init_adapter")
        outcome = run_tune(config, p["prepare"].uri, sweep_storage(p.layout),
                           name=f"tune-{p['prepare'].fingerprint}", init_adapter=init.files() if init else None)
        best_config = config_with(config, outcome.best_params)
        best_plan = plan(best_config)
        if best_plan["train"].status != "hit":
            commit_best_trial(best_plan, outcome.best_run_dir)
        manifest = run_pipeline(best_config, log=log, run_id=run_id)
    manifest["tune"] = {"best_params": outcome.best_params, "best_metric": outcome.best_metric,
                        "trials": outcome.trials}
    return copy.deepcopy(manifest)
