"""The run report: `runs/<run-id>/report.md` plus PNG curves, written at the end of every run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workflows.artifacts import atomic_write_text
from workflows.storage import read_text

_METRIC_ORDER = ("loss", "perplexity", "token_accuracy", "exact_match", "match", "accuracy", "macro_f1", "rows")


def _read_jsonl(location: str) -> list[dict[str, Any]]:
    """Rows of a JSONL file, a local path or a work-directory URI (`s3://...`); [] if it is missing."""
    text = read_text(location)
    if text is None:
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash: the rest of the file is still good
    return rows


def _plot(run_dir: Path, name: str, series: dict[str, tuple[list[float], list[float]]], ylabel: str) -> str | None:
    series = {k: v for k, v in series.items() if v[0]}
    if not series:
        return None
    import matplotlib  # only when there is something to plot: it takes a second to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for label, (x, y) in series.items():
        ax.plot(x, y, marker="o", markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / name)
    plt.close(fig)
    return name


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return out


def write_report(run_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write report.md (and PNGs beside it) for a run manifest, finished or failed; return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = manifest.get("stages", {})
    lines = [f"# loraflow run {manifest.get('run_id')}", "",
             f"config: `{manifest.get('config_file')}` · loraflow {manifest.get('loraflow_version')} · "
             f"Ray started: {manifest.get('ray_started')}", ""]
    lines += _failure(run_dir, manifest)
    lines += ["## Stages", ""]
    lines += _table(["stage", "cache", "seconds", "fingerprint", "why"],
                    [[n, "hit" if s["status"] == "hit" else "ran", s["seconds"], f"`{s['fingerprint']}`", s["why"]]
                     for n, s in stages.items()])
    lines += _data(stages.get("prepare", {}).get("outputs", {}))
    lines += _training(run_dir, stages.get("train", {}).get("outputs", {}))
    ev = stages.get("evaluate", {}).get("outputs", {}).get("metrics", {})
    lines += _evaluation(ev)
    lines += _registry(stages.get("register", {}).get("outputs", {}), ev)
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _failure(run_dir: Path, manifest: dict[str, Any]) -> list[str]:
    error = manifest.get("error")
    if not error:
        return []
    where = f"stage **{error['stage']}**" if error.get("stage") else "before any stage"
    lines = ["## Failed", "", f"{where}: {error['type']}: {error['message']}", ""]
    if (run_dir / "run.log").is_file():
        lines += [f"Everything the run printed (and the traceback) is in `{run_dir / 'run.log'}`.", ""]
    config = manifest.get("config_file") or "<config>"
    lines += ["Resume with the same command, e.g.", "", f"    loraflow run {config}", "",
              "Finished stages are cache hits; training continues from its last registered checkpoint.", ""]
    return lines


def _data(prep: dict[str, Any]) -> list[str]:
    counts = prep.get("counts") or {}
    if not counts:
        return []
    rejected = counts.get("rejected") or {}
    flat = [[k, v] for k, v in counts.items() if not isinstance(v, dict)]
    flat += [[f"rejected: {reason}", n] for reason, n in sorted(rejected.items())]
    return ["", "## Data", "", *_table(["count", "rows"], flat)]


def _training(run_dir: Path, train: dict[str, Any]) -> list[str]:
    rows = _read_jsonl(train["metrics_path"]) if train.get("metrics_path") else []
    if not rows and not train.get("metrics"):
        return []
    lines = ["", "## Training", ""]
    loss_png = _plot(run_dir, "loss.png", {"train loss": _series(rows, "train_loss"),
                                           "eval loss": _series(rows, "eval_loss")}, "loss")
    tps_png = _plot(run_dir, "tokens_per_s.png", {"tokens/s": _series(rows, "tokens_per_s")}, "tokens/s")
    lines += [f"![loss]({loss_png})" if loss_png else "", f"![tokens/s]({tps_png})" if tps_png else ""]
    final = train.get("metrics") or {}
    keep = [k for k in ("steps", "train_loss", "eval_loss", "tokens_per_s", "padding_fraction",
                        "allreduce_bytes_per_step", "adapter_param_bytes", "base_param_bytes", "broadcast_bytes")
            if k in final]
    return lines + (_table(["metric", "value"], [[k, final[k]] for k in keep]) if keep else [])


def _evaluation(ev: dict[str, Any]) -> list[str]:
    models = ev.get("models", {})
    if not models:
        return []
    keys = [k for k in _METRIC_ORDER if any(k in m for m in models.values())]
    lines = ["", "## Evaluation (same rows for every model)", ""]
    lines += _table(["model", *keys], [[name, *(m.get(k, "") for k in keys)] for name, m in models.items()])
    rows = []
    for metric, d in (ev.get("diff") or {}).items():
        for other in ("base", "champion"):
            if f"new_minus_{other}" in d:
                lo, hi = d.get(f"ci95_vs_{other}") or (d.get("ci95") if other == "champion" else None) or (None, None)
                ci = f"[{lo:.4g}, {hi:.4g}]" if lo is not None else ""
                rows.append([f"new − {other}", metric, d[f"new_minus_{other}"], ci])
    if rows:
        lines += ["", "Differences on the same rows, with paired-bootstrap 95% intervals:", ""]
        lines += _table(["comparison", "metric", "difference", "95% CI"], rows)
    return lines


def _registry(reg: dict[str, Any], ev: dict[str, Any]) -> list[str]:
    if not reg:
        return []
    d = reg.get("decision") or {}
    lines = ["", "## Registry and promotion gate", "",
             f"registered `{reg.get('name')}:{reg.get('version')}`; "
             f"{'**promoted**' if d.get('promote') else '**not promoted**'}: {d.get('reason', '')}"]
    numbers = d.get("numbers") or {}
    if numbers.get("compared_with") == "base":
        lines += ["", "There is no champion yet, so the bar is the base model on the same rows."]
        if ev.get("task") == "seq_cls":
            lines += ["For a classifier the base is an untrained head: the bar is chance."]
    if numbers:
        lines += ["", "```json", json.dumps(numbers, indent=2, sort_keys=True, default=str), "```"]
    return lines
