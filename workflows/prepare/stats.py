"""Statistics of the prepare stage, reduced per batch in the workers.

Each write task turns its bundle into one small summary (counts, token-length histograms, label
counts, a row-digest sum); the driver only adds summaries up, never loops over rows.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

DIGEST_BITS = 128
_SPLITS = ("train", "eval")


def batch_summary(batch: pa.Table, max_seq_len: int) -> dict[str, Any]:
    """Counts by kind and reject reason (+ a first example of each), truncations, token-length
    histograms and trained tokens per split, label counts: one encoded batch."""
    kinds = np.asarray(batch.column("kind").to_pylist(), dtype=object)
    summary: dict[str, Any] = {"counts": dict(Counter(kinds.tolist())), "reasons": {}, "examples": {},
                               "truncated": 0, "tokens": {}, "labels": {}}
    rejects = np.flatnonzero(kinds == "reject")
    if len(rejects):
        reasons = batch.column("reason").take(rejects).to_pylist()
        summary["reasons"] = dict(Counter(reasons))
        first = {r: i for i, r in reversed(list(zip(rejects.tolist(), reasons)))}
        summary["examples"] = {r: f"{batch.column('source')[i]}:{batch.column('row')[i]}: {batch.column('detail')[i]}"
                               for r, i in first.items()}
    kept = np.isin(kinds, _SPLITS)
    summary["truncated"] = int(np.asarray(batch.column("truncated").fill_null(False))[kept].sum())
    lengths = np.asarray(batch.column("num_tokens").fill_null(0))
    trained = np.asarray(batch.column("num_trained").fill_null(0)) if "num_trained" in batch.column_names else lengths
    for split in _SPLITS:
        mask = kinds == split
        summary["tokens"][split] = {"hist": np.bincount(lengths[mask], minlength=max_seq_len + 1).tolist(),
                                    "trained": int(trained[mask].sum())}
    if "label_name" in batch.column_names:
        summary["labels"] = dict(Counter(batch.column("label_name").filter(pa.array(kept)).to_pylist()))
    return summary


def merge_summaries(summaries: list[dict[str, Any]], max_seq_len: int) -> dict[str, Any]:
    total: dict[str, Any] = {"counts": Counter(), "reasons": Counter(), "examples": {}, "truncated": 0,
                             "labels": Counter(),
                             "tokens": {s: {"hist": np.zeros(max_seq_len + 1, np.int64), "trained": 0} for s in _SPLITS}}
    for s in summaries:
        total["counts"].update(s["counts"])
        total["reasons"].update(s["reasons"])
        total["labels"].update(s["labels"])
        total["truncated"] += s["truncated"]
        for reason, where in s["examples"].items():
            total["examples"].setdefault(reason, where)
        for split in _SPLITS:
            hist = np.asarray(s["tokens"][split]["hist"], np.int64)
            if len(hist) > len(total["tokens"][split]["hist"]):
                hist, total["tokens"][split]["hist"] = total["tokens"][split]["hist"], hist
            total["tokens"][split]["hist"][: len(hist)] += hist
            total["tokens"][split]["trained"] += s["tokens"][split]["trained"]
    for split in _SPLITS:
        hist = total["tokens"][split]["hist"]
        total["tokens"][split]["total"] = int((hist * np.arange(len(hist))).sum())
    total["counts"]["rows_read"] = sum(v for k, v in total["counts"].items() if k != "rows_read")
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in total.items()}


def token_summary(tokens: dict[str, Any]) -> dict[str, Any]:
    """total / trained tokens, examples and mean, p50, p95, max length from a length histogram."""
    hist = np.asarray(tokens["hist"])
    n = int(hist.sum())
    if n == 0:
        return {"examples": 0, "total": 0, "trained": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    cdf = np.cumsum(hist)
    return {"examples": n, "total": tokens["total"], "trained": tokens["trained"],
            "mean": round(tokens["total"] / n, 2), "p50": int(np.searchsorted(cdf, 0.5 * n)),
            "p95": int(np.searchsorted(cdf, 0.95 * n)), "max": int(np.flatnonzero(hist)[-1])}


def label_vocabulary(label_counts: dict[str, int]) -> list[str]:
    """Sorted label names (index = label id): integers numerically first, then strings, so
    labels 0..k-1 keep their own ids and the order never depends on the data's row order."""
    return sorted(label_counts, key=lambda name: (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name))


def digest_rows(table: pa.Table) -> tuple[int, int]:
    """(sum of per-row sha256 prefixes mod 2^128, row count): add these up over any split of a
    dataset into files and the total is the same, so digests ignore file names and order."""
    getters = []
    for name in sorted(table.column_names):
        column = table.column(name).combine_chunks()
        if pa.types.is_list(column.type):
            values, offsets = column.values.to_numpy(zero_copy_only=False), column.offsets.to_numpy()
            getters.append((name.encode(), lambda i, v=values, o=offsets: v[o[i]:o[i + 1]].tobytes()))
        else:
            py = column.to_pylist()
            getters.append((name.encode(), lambda i, p=py: repr(p[i]).encode()))
    total = 0
    for i in range(table.num_rows):
        h = hashlib.sha256()
        for name, get in getters:
            h.update(name)
            h.update(get(i))
        total += int.from_bytes(h.digest()[: DIGEST_BITS // 8], "big")
    return total % 2**DIGEST_BITS, table.num_rows


def combine_digests(parts: list[tuple[int, int]], salt: str = "") -> str:
    """The rows digest of a split (hex, 32 chars) from its per-file `digest_rows` results."""
    total = sum(p[0] for p in parts) % 2**DIGEST_BITS
    count = sum(p[1] for p in parts)
    return hashlib.sha256(f"{total:032x}:{count}:{salt}".encode()).hexdigest()[:32]
