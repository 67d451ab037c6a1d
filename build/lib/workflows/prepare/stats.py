"""Statistics of the prepare stage, reduced in the tasks that hold the rows.

Each bucket task returns small summaries (token-length histograms, row digests); the driver only
adds them up, never loops over rows.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

DIGEST_BITS = 128


def merge_tokens(parts: list[dict[str, Any]], max_seq_len: int) -> dict[str, Any]:
    """Add up `{"hist", "trained"}` token summaries; adds `total` (tokens)."""
    hist = np.zeros(max_seq_len + 1, np.int64)
    trained = 0
    for p in parts:
        h = np.asarray(p["hist"], np.int64)
        hist[: len(h)] += h[: len(hist)]
        trained += p["trained"]
    return {"hist": hist, "trained": trained, "total": int((hist * np.arange(len(hist))).sum())}


def label_ids(names: pa.ChunkedArray, vocabulary: list[str]) -> pa.Array:
    """The id (index in `vocabulary`) of each label name, as int64."""
    return pc.index_in(names, value_set=pa.array(vocabulary, pa.string())).cast(pa.int64())


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
