"""Aggregate metrics and paired bootstrap intervals from the evaluate stage's per-example rows.

Pure numpy on columns (no Ray, no torch). Every causal metric is a ratio of sums over examples
(loss = sum of token NLLs / label tokens), so the aggregate does not depend on how rows were split
between actors or batches. A bootstrap resample of the examples is a vector of multinomial counts
`w`; a metric on a resample is then `(w @ num) / (w @ den)`, the same formula with weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

Columns = Mapping[str, np.ndarray]  # one model's rows, aligned by example_id across models

# metric -> (numerator column, denominator column or None for "one per example")
_CAUSAL_RATIOS = {"loss": ("loss_sum", "tokens"), "token_accuracy": ("correct_tokens", "tokens")}
_GENERATION_RATIOS = {"exact_match": ("exact_match", "generated"), "normalized_match": ("normalized_match", "generated")}
_CLASS_RATIOS = {"loss": ("loss", None), "accuracy": ("correct", None)}


def _ratios(task: str, rows: Columns) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    n = len(next(iter(rows.values())))
    spec = dict(_CAUSAL_RATIOS if task == "causal_lm" else _CLASS_RATIOS)
    if task == "causal_lm" and np.asarray(rows["generated"]).any():
        spec.update(_GENERATION_RATIOS)
    out = {}
    for metric, (num, den) in spec.items():
        num_v = np.asarray(rows[num], dtype=np.float64)
        if den == "generated":  # a match counts only where generation ran
            num_v = num_v * np.asarray(rows["generated"], dtype=np.float64)
        den_v = np.ones(n) if den is None else np.asarray(rows[den], dtype=np.float64)
        out[metric] = (num_v, den_v)
    return out


def _one_hot(values: np.ndarray, classes: int) -> np.ndarray:
    out = np.zeros((len(values), classes))
    out[np.arange(len(values)), values] = 1.0
    return out


def _macro_f1(weights: np.ndarray, labels: np.ndarray, preds: np.ndarray, classes: int) -> np.ndarray:
    """Macro-F1 for each row of `weights` (S, n); classes never seen nor predicted are left out."""
    true, pred = _one_hot(labels, classes), _one_hot(preds, classes)
    support, predicted, tp = weights @ true, weights @ pred, weights @ (true * pred)
    denom = support + predicted
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denom > 0, 2 * tp / denom, np.nan)
    return np.nanmean(f1, axis=-1)


def aggregate(task: str, rows: Columns, label_names: list[str] | None = None) -> dict[str, Any]:
    """One model's metrics: causal (loss, perplexity, token_accuracy, tokens, [exact_match,
    normalized_match, generated]) or classification (loss, accuracy, macro_f1, per_class)."""
    n = len(rows["example_id"])
    out: dict[str, Any] = {"rows": n}
    for metric, (num, den) in _ratios(task, rows).items():
        out[metric] = float(num.sum() / den.sum()) if den.sum() > 0 else math.nan
    if task == "causal_lm":
        out["perplexity"] = math.exp(out["loss"]) if math.isfinite(out["loss"]) else math.nan
        out["tokens"] = int(np.asarray(rows["tokens"]).sum())
        if "exact_match" in out:
            out["generated"] = int(np.asarray(rows["generated"]).sum())
        return out
    labels, preds = np.asarray(rows["label"], dtype=np.int64), np.asarray(rows["pred"], dtype=np.int64)
    classes = max(len(label_names or []), int(labels.max(initial=0)) + 1, int(preds.max(initial=0)) + 1)
    out["macro_f1"] = float(_macro_f1(np.ones((1, n)), labels, preds, classes)[0])
    names = label_names or [str(i) for i in range(classes)]
    out["per_class"] = {
        names[c]: {"support": int((labels == c).sum()), "predicted": int((preds == c).sum()),
                   "correct": int(((labels == c) & (preds == c)).sum())}
        for c in range(classes) if (labels == c).any() or (preds == c).any()}
    return out


def paired_bootstrap(task: str, a: Columns, b: Columns, samples: int, seed: int = 0,
                     max_cells: int = 20_000_000) -> dict[str, dict[str, Any]]:
    """metric -> {"value": metric(a) - metric(b), "ci95": [lo, hi]} by resampling examples (the
    same resample for both models: they were scored on the same rows). `samples=0`: no interval."""
    n = len(a["example_id"])
    ra, rb = _ratios(task, a), _ratios(task, b)
    metrics = [m for m in ra if m in rb]
    extra = ["perplexity"] if task == "causal_lm" else ["macro_f1"]
    full = _resampled(task, ra, rb, a, b, metrics, np.ones((1, n)))
    result = {m: {"value": float(full[m][0])} for m in metrics + extra}
    if samples <= 0 or n == 0:
        return result
    rng = np.random.default_rng(seed)
    chunk = max(1, max_cells // max(n, 1))  # bound the (samples, n) weight matrix
    draws: dict[str, list[np.ndarray]] = {m: [] for m in metrics + extra}
    for start in range(0, samples, chunk):
        w = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, samples - start)).astype(np.float64)
        for m, v in _resampled(task, ra, rb, a, b, metrics, w).items():
            draws[m].append(v)
    for m, parts in draws.items():
        values = np.concatenate(parts)
        lo, hi = np.nanpercentile(values, [2.5, 97.5]) if np.isfinite(values).any() else (math.nan, math.nan)
        result[m]["ci95"] = [float(lo), float(hi)]
    return result


def _resampled(task, ra, rb, a, b, metrics, w) -> dict[str, np.ndarray]:
    """Differences a - b of every metric under each row of weights `w` (S, n)."""
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for m in metrics:
            out[m] = (w @ ra[m][0]) / (w @ ra[m][1]) - (w @ rb[m][0]) / (w @ rb[m][1])
        if task == "causal_lm":
            loss_a = (w @ ra["loss"][0]) / (w @ ra["loss"][1])
            loss_b = (w @ rb["loss"][0]) / (w @ rb["loss"][1])
            out["perplexity"] = np.exp(loss_a) - np.exp(loss_b)
        else:
            la, lb = np.asarray(a["label"], dtype=np.int64), np.asarray(b["label"], dtype=np.int64)
            pa, pb = np.asarray(a["pred"], dtype=np.int64), np.asarray(b["pred"], dtype=np.int64)
            classes = int(max(la.max(initial=0), pa.max(initial=0), pb.max(initial=0))) + 1
            out["macro_f1"] = _macro_f1(w, la, pa, classes) - _macro_f1(w, lb, pb, classes)
    return out
