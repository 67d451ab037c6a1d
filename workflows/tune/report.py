"""What a sweep shows: a console line per trial as it ends, and in `runs/<id>/`:

    tune.md                       each trial's parameters, validation metric, steps run, stopped early
    tune_metric_vs_step.png       the validation metric against the step, one line per trial
    tune_metric_vs_rank_lr.png    each trial's last validation metric against lora.r and train.lr
    tensorboard/tune/<trial>/     TensorBoard scalars of every trial, by step

Every figure here is on the validation split (carved out of the train rows); the eval-split score
of the chosen adapter is the evaluate stage's, measured once after selection.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from workflows.config import PipelineConfig, config_from_dict
from workflows.train.stage import plan_steps
from workflows.tune.cleanup import release_orphaned_placement_groups
from workflows.tune.space import trial_config


@dataclass
class TrialRecord:
    trial_id: str
    params: dict[str, Any]  # as sampled (a target set by its name)
    rank: int  # the trial's lora.r and train.lr, searched or not
    lr: float
    metric: float | None  # the last validation value reported
    steps: int  # the last step reported
    budget: int  # the steps its config plans
    seconds: float | None = None  # training time of its Ray Train run (the last report's elapsed_s)
    error: str | None = None
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, validation metric)
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # every numeric key
    best: bool = False

    @property
    def finished(self) -> bool:
        return self.error is None and self.steps >= self.budget

    @property
    def stopped_early(self) -> bool:
        return self.error is None and self.steps < self.budget

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("scalars")
        return {**out, "finished": self.finished, "stopped_early": self.stopped_early}


def _budget(config: PipelineConfig, params: dict[str, Any], train_rows: int) -> tuple[PipelineConfig, int]:
    cfg = trial_config(config, params)
    return cfg, plan_steps(train_rows, cfg.train)


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _train_seconds(rows: list[dict[str, Any]]) -> float | None:
    """A trial's training time: the sum over its Ray Train run's attempts (a trial paused at a rung,
    or restored, resumes from a checkpoint and its `elapsed_s` and `steps_this_run` start again)."""
    total, last, prev = 0.0, None, None
    for r in rows:
        step, run_steps, elapsed = (_number(r.get(k)) for k in ("step", "steps_this_run", "elapsed_s"))
        if step is None or run_steps is None or elapsed is None:
            continue
        if prev is not None and run_steps - prev[1] != step - prev[0]:
            total += last  # the previous attempt ended there
        prev, last = (step, run_steps), elapsed
    return None if last is None else total + last


def trial_records(grid: Any, config: PipelineConfig, key: str, train_rows: int) -> list[TrialRecord]:
    """One record per trial of a Tune `ResultGrid`, from each trial's reported history."""
    records = []
    for result in grid:
        metrics = result.metrics or {}
        params = {k: result.config.get(k) for k in config.tune.search_space}
        cfg, budget = _budget(config, params, train_rows)
        df = result.metrics_dataframe
        rows = df.to_dict("records") if df is not None else []
        scalars: dict[str, list[tuple[int, float]]] = {}
        for row in rows:
            step = _number(row.get("step"))
            if step is None:
                continue
            for name, value in row.items():
                number = _number(value)
                if number is not None and (name.startswith("validation_") or name in ("train_loss", "eval_loss", "lr")):
                    scalars.setdefault(name, []).append((int(step), number))
        history = scalars.get(key, [])
        steps = max((int(_number(r.get("step")) or 0) for r in rows), default=0)
        seconds = _train_seconds(rows)
        records.append(TrialRecord(
            trial_id=str(metrics.get("trial_id") or Path(result.path).name), params=params, rank=cfg.lora.r,
            lr=cfg.train.lr, metric=history[-1][1] if history else None, steps=steps, budget=budget, seconds=seconds,
            error=str(result.error).splitlines()[0][:300] if result.error else None, history=history,
            scalars=scalars))
    return sorted(records, key=lambda r: r.trial_id)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())


class TrialLines(tune.Callback):
    """One console line per trial that finishes, is stopped early, or fails (in the driver; Tune
    pickles it with the experiment, so it holds plain data only). Every few seconds it also
    releases the placement groups stopped trials left behind (`workflows.tune.cleanup`)."""

    RELEASE_EVERY_S = 2.0

    def __init__(self, config_dict: dict[str, Any], source_path: str | None, key: str, train_rows: int,
                 total: int):
        self.config_dict, self.source_path, self.key, self.train_rows = config_dict, source_path, key, train_rows
        self.total, self.ended = total, 0
        self._released_at = 0.0

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self._released_at >= self.RELEASE_EVERY_S:
            self._released_at = time.monotonic()
            release_orphaned_placement_groups()

    def _line(self, trial: Any) -> str:
        config = config_from_dict(self.config_dict, origin="tune", source_path=self.source_path)
        params = {k: trial.config.get(k) for k in config.tune.search_space}
        _, budget = _budget(config, params, self.train_rows)
        last = trial.last_result or {}
        step = int(last.get("step") or 0)
        value = last.get(self.key)
        how = "finished" if step >= budget else "stopped early by " + {"async": "ASHA", "sync": "synchronous halving"}[
            config.tune.halving]
        shown = f"{self.key} {value:.4g}" if isinstance(value, (int, float)) else f"no {self.key}"
        return (f"[tune] trial {self.ended}/{self.total} {trial.trial_id} {how} at step {step}/{budget}: {shown} "
                f"({_params_text(params)})")

    def _count(self, trials: list, trial: Any) -> None:
        """This trial's place among the ended ones (restored trials included, after a resume)."""
        self.ended = 1 + sum(t is not trial and t.status in ("TERMINATED", "ERROR") for t in trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._count(trials, trial)
        print(self._line(trial), flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._count(trials, trial)
        error = str(getattr(trial, "error_file", "") or "")
        print(f"[tune] trial {self.ended}/{self.total} {trial.trial_id} failed "
              f"({_params_text(trial.config)}); its error: {error}", flush=True)


# ----------------------------------------------------------------------------- files


def _lr_ticks(lrs: list[float]) -> tuple[list[float], list[str]]:
    low, high = min(lrs), max(lrs)
    ticks = [m * 10.0**e for e in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
             for m in (1, 2, 5) if low / 1.5 <= m * 10.0**e <= high * 1.5]
    return ticks, [f"{t:.0e}" for t in ticks]


def _plots(run_dir: Path, records: list[TrialRecord], key: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    names = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in records:
        if not r.history:
            continue
        steps, values = zip(*r.history)
        style = "-" if r.finished else "--"
        ax.plot(steps, values, style, marker="o", markersize=3, linewidth=2.2 if r.best else 1.2,
                label=f"{r.trial_id[-5:]} r={r.rank} lr={r.lr:.1e}"
                + (f" {r.params['lora.target_modules']}" if "lora.target_modules" in r.params else "")
                + (" (chosen)" if r.best else "")
                + ("" if r.finished else " (stopped)"))
    ax.set_xlabel("step")
    ax.set_ylabel(f"{key} (validation split)")
    ax.set_title("every trial: validation metric by step (dashed: stopped early)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "tune_metric_vs_step.png", dpi=110)
    plt.close(fig)
    names.append("tune_metric_vs_step.png")

    scored = [r for r in records if r.metric is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for r in scored:
        color = "tab:red" if r.best else "tab:blue" if r.finished else "tab:gray"
        marker = "*" if r.best else "o" if r.finished else "x"
        left.scatter(r.rank, r.metric, c=color, marker=marker, s=80 if r.best else 30)
        right.scatter(r.lr, r.metric, c=color, marker=marker, s=80 if r.best else 30)
    left.set_xscale("log", base=2)
    ranks = sorted({r.rank for r in scored})
    left.set_xticks(ranks, [str(r) for r in ranks])
    left.set_xlabel("lora.r")
    left.set_ylabel(f"last {key} (validation split)")
    right.set_xscale("log")
    right.set_xticks(*_lr_ticks([r.lr for r in scored]))  # 1, 2, 5 x 10^k: readable within a decade
    right.xaxis.set_minor_formatter(NullFormatter())
    right.set_xlabel("train.lr")
    fig.suptitle("last validation metric of each trial (star: chosen; x: stopped early)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "tune_metric_vs_rank_lr.png", dpi=110)
    plt.close(fig)
    names.append("tune_metric_vs_rank_lr.png")
    return names


def _tensorboard(run_dir: Path, records: list[TrialRecord]) -> Path:
    from tensorboardX import SummaryWriter

    root = run_dir / "tensorboard" / "tune"
    for r in records:
        writer = SummaryWriter(logdir=str(root / r.trial_id))
        for name, points in r.scalars.items():
            for step, value in points:
                writer.add_scalar(f"tune/{name}", value, step)
        writer.add_text("tune/params", _params_text(r.params))
        writer.close()
    return root


def _eval_score(manifest: dict[str, Any], metric: str) -> dict[str, Any]:
    models = (((manifest.get("stages") or {}).get("evaluate") or {}).get("outputs") or {}).get("metrics", {})
    new = (models.get("models") or {}).get("new") or {}
    return {k: v for k, v in new.items() if isinstance(v, (int, float)) and k != "rows"} | {"rows": new.get("rows")}


def write_tune_report(run_dir: Path, config: PipelineConfig, outcome: Any, manifest: dict[str, Any]) -> dict[str, Any]:
    """tune.md, the two pictures and the TensorBoard events of a finished sweep; returns their paths."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tc, key, records = config.tune, outcome.metric, outcome.trials
    pictures = _plots(run_dir, records, key)
    tb = _tensorboard(run_dir, records)
    ran, planned = sum(r.steps for r in records), sum(r.budget for r in records)
    timed = [r for r in records if r.seconds and r.steps]
    pace = sum(r.seconds for r in timed) / sum(r.steps for r in timed) if timed else None
    best = next(r for r in records if r.best)
    score = _eval_score(manifest, key.removeprefix("validation_"))
    keys = list(tc.search_space)
    lines = [
        "# loraflow tune", "",
        f"Search: {tc.search}, {len(records)} trials, metric `{key}` ({tc.direction}) on the validation split "
        f"({manifest.get('stages', {}).get('prepare', {}).get('outputs', {}).get('counts', {}).get('validation_rows', '?')}"
        f" rows carved out of the train rows by example hash, tune.validation_fraction {tc.validation_fraction}).",
        (f"{'ASHA' if tc.halving == 'async' else 'Synchronous successive halving'}: grace {tc.grace_period} validation(s) of train.eval_every {config.train.eval_every} steps, "
         f"reduction factor {tc.reduction_factor}." if tc.asha else "No early stopping (tune.asha: false)."),
        (f"Steps run: {ran} of {planned} planned ({1 - ran / planned:.0%} saved by early stopping"
         + (f"; at the trials' mean {pace:.2f} s per step, about {(planned - ran) * pace / 60:.1f} min of training)."
            if pace else ").")) if planned else "",
        "", "| trial | " + " | ".join(keys) + f" | {key} | steps | train s | stopped early |",
        "|---" * (len(keys) + 5) + "|",
    ]
    for r in records:
        mark = " **(chosen)**" if r.best else ""
        status = "failed: " + r.error if r.error else "yes" if r.stopped_early else "no"
        lines.append(f"| {r.trial_id}{mark} | " + " | ".join(_fmt(r.params.get(k)) for k in keys)
                     + f" | {_fmt(r.metric)} | {r.steps}/{r.budget} | {_fmt(r.seconds and round(r.seconds))} | {status} |")
    lines += [
        "", f"Chosen: trial {best.trial_id} ({_params_text(best.params)}), the best `{key}` of the trials that "
        "ran their whole budget.",
        "", "Its adapter was then scored once on the eval split by the evaluate stage (nothing was selected on it): "
        + (", ".join(f"{k} {_fmt(v)}" for k, v in score.items() if k != "rows") + f" on {score.get('rows')} rows."
           if score.get("rows") else "not evaluated."),
        "", *(f"![{p}]({p})" for p in pictures),
        "", f"TensorBoard: `tensorboard --logdir {tb}`", "",
    ]
    (run_dir / "tune.md").write_text("\n".join(lines))
    return {"report": str(run_dir / "tune.md"), "pictures": [str(run_dir / p) for p in pictures],
            "tensorboard": str(tb), "eval_score": score, "steps_run": ran, "steps_planned": planned,
            "seconds_per_step": pace}
