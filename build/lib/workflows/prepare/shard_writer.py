"""Phase 1 of the prepare stage's writes: a Ray Data datasink that routes and buckets encoded rows.

Each write task receives a bundle of encoded rows (`workflows.prepare.encode`) and writes, from
whichever node it runs on, straight to the stage's output root (a shared volume or an object store):

    rejects/part-<task>.parquet               source, row, reason, detail, raw
    _staging/b<bucket>/<split>-<task>.parquet  train and eval rows, bucketed by a hash of their
                                               content id (`finalize.bucket_of`)

It returns a small summary (counts by kind, reject reasons with a first example each, label names)
for the driver to add up. Phase 2 (`workflows.prepare.finalize`) turns each bucket into the final
shards. Nothing here depends on which rows a bundle holds or in what order they came.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from workflows import storage
from workflows.prepare.finalize import bucket_of, staged

ROWS_PER_WRITE = 8192  # rows per write task: fewer, larger staging files
REJECT_COLUMNS = ["source", "row", "reason", "detail", "raw"]
STAGED_COLUMNS = {  # what phase 2 needs of a train/eval row
    "causal_lm": ["example_id", "input_ids", "labels", "prompt_len", "reference", "num_tokens", "num_trained",
                  "truncated"],
    "seq_cls": ["example_id", "input_ids", "label_name", "text", "num_tokens", "truncated"],
}


class BucketedShardWriter(Datasink):
    """Writes `rejects/` and `_staging/` under `root` (see the module docstring)."""

    def __init__(self, root: str, task: str, buckets: int):
        self.root, self.task, self.buckets = root, task, buckets
        self.results: list[dict[str, Any]] = []

    @property
    def min_rows_per_write(self) -> int:
        return ROWS_PER_WRITE

    @property
    def supports_distributed_writes(self) -> bool:
        return True  # the root is a store every node writes to, never the driver's own disk

    def write(self, blocks: Any, ctx: Any) -> dict[str, Any]:
        tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
        if not tables:
            return {"summary": None}
        table = pa.concat_tables(tables)
        kinds = table.column("kind")
        rejects = table.filter(pc.equal(kinds, "reject")).select(REJECT_COLUMNS)
        if rejects.num_rows:
            storage.write_parquet(rejects, storage.join(self.root, "rejects", f"part-{ctx.task_idx:05d}.parquet"))
        for split in ("train", "eval"):
            rows = table.filter(pc.equal(kinds, split)).select(STAGED_COLUMNS[self.task])
            if rows.num_rows == 0:
                continue
            buckets = np.array([bucket_of(e, self.buckets) for e in rows.column("example_id").to_pylist()])
            for b in np.unique(buckets):
                storage.write_parquet(rows.filter(pa.array(buckets == b)),
                                      storage.join(staged(self.root, int(b)), f"{split}-{ctx.task_idx:05d}.parquet"))
        return {"summary": _summary(table)}

    def on_write_complete(self, write_result: Any) -> None:
        self.results = [r["summary"] for r in write_result.write_returns if r["summary"] is not None]


def _summary(table: pa.Table) -> dict[str, Any]:
    """Counts by kind and reject reason (+ the first example of each), label names of kept rows."""
    kinds = table.column("kind").to_pylist()
    summary: dict[str, Any] = {"counts": dict(Counter(kinds)), "reasons": {}, "examples": {}, "labels": {}}
    rejects = [i for i, k in enumerate(kinds) if k == "reject"]
    if rejects:
        reasons = table.column("reason").take(pa.array(rejects)).to_pylist()
        summary["reasons"] = dict(Counter(reasons))
        for i, reason in zip(rejects, reasons):
            summary["examples"].setdefault(
                reason, f"{table.column('source')[i]}:{table.column('row')[i]}: {table.column('detail')[i]}")
    if "label_name" in table.column_names:
        kept = pa.array([k in ("train", "eval") for k in kinds])
        summary["labels"] = dict(Counter(table.column("label_name").filter(kept).to_pylist()))
    return summary


def merge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {"counts": Counter(), "reasons": Counter(), "examples": {}, "labels": Counter()}
    for s in summaries:
        total["counts"].update(s["counts"])
        total["reasons"].update(s["reasons"])
        total["labels"].update(s["labels"])
        for reason, where in s["examples"].items():
            total["examples"].setdefault(reason, where)
    total["counts"]["rows_read"] = sum(total["counts"].values())
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in total.items()}
