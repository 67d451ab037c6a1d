"""Phase 2 of the prepare stage: one Ray task per bucket turns its staged rows into final shards.

Phase 1 (`shard_writer`) hashed every encoded example's content id into one of `buckets` buckets,
so the copies of an example and nothing else decide a bucket's rows. Per bucket, on any node,
reading and writing the work store directly:

    dedupe      one row per example id; an example that is also in eval leaves train (no leakage)
    validation  for a sweep (`tune.validation_fraction`): the train rows whose sha256(seed,
                "validation", example id) falls under the fraction move to validation/, shaped like
                eval rows (unpacked, with their ids); trials compare themselves on it alone
    order       by sha256(seed, example id): a seeded order that does not depend on how the
                input was sorted (a class-sorted file trains like a shuffled one)
    pack        causal LM train rows, first-fit-decreasing over windows of that order
    write       train/part-<bucket>.parquet, eval/part-<bucket>.parquet
    summarise   rows, digests, token histograms: what the driver adds up

Memory per task is one bucket, and the number of buckets grows with the input, so it stays flat as
the data grows (bench/results/prepare.md). The result is the same whatever the number of readers,
actors and write tasks of phase 1, and whatever order their rows arrived in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from workflows import storage
from workflows.prepare.packing import pack_table, with_positions
from workflows.prepare.stats import digest_rows, label_ids
from workflows.token_tags import inside_ids, token_labels

PACK_WINDOW = 2048  # examples per packing window: more packs tighter, costs memory
LIST_I32 = pa.list_(pa.int32())
SCHEMAS = {
    ("causal_lm", "train"): pa.schema([("input_ids", LIST_I32), ("labels", LIST_I32),
                                       ("position_ids", LIST_I32), ("num_examples", pa.int32())]),
    ("seq_cls", "train"): pa.schema([("input_ids", LIST_I32), ("label", pa.int64())]),
}
SCHEMAS["causal_lm", "eval"] = pa.schema([*SCHEMAS["causal_lm", "train"], ("example_id", pa.string()),
                                          ("prompt_len", pa.int32()), ("reference", pa.string())])
SCHEMAS["seq_cls", "eval"] = pa.schema([*SCHEMAS["seq_cls", "train"], ("example_id", pa.string()),
                                        ("text", pa.string())])
# token_cls eval rows are whole (never truncated) and keep their words, to be scored word by word.
SCHEMAS["token_cls", "train"] = pa.schema([("input_ids", LIST_I32), ("labels", LIST_I32)])
SCHEMAS["token_cls", "eval"] = pa.schema([*SCHEMAS["token_cls", "train"], ("example_id", pa.string()),
                                          ("word_ids", LIST_I32), ("word_labels", LIST_I32), ("text", pa.string()),
                                          ("word_starts", LIST_I32), ("word_ends", LIST_I32)])


def bucket_of(example_id: str, buckets: int) -> int:
    """The bucket of a content id (16 hex chars): identical examples always share one."""
    return int(example_id[:8], 16) % buckets


def order_key(example_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{example_id}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BucketPlan:
    """What every bucket task needs (it travels to the task)."""

    root: str  # the stage's output root: a local path or a store URI
    task: str  # causal_lm | seq_cls | token_cls
    packed: bool
    max_seq_len: int
    seed: int
    dedupe: bool
    label_names: list[str] | None
    label_all_tokens: bool = False  # token_cls: every sub-token labelled, not only a word's first
    validation_fraction: float = 0.0  # > 0: carve validation/ out of the train rows (a sweep)


def validation_side(example_id: str, seed: int, fraction: float) -> bool:
    """Whether a train example goes to validation: a seeded hash of its content id against the
    fraction (salted apart from the eval split's hash), so the split is stable as data is added."""
    h = int(hashlib.sha256(f"{seed}:validation:{example_id}".encode()).hexdigest()[:8], 16)
    return h / 2**32 < fraction


def _carve_validation(plan: BucketPlan, rows: dict[str, pa.Table | None]) -> dict[str, pa.Table | None]:
    train = rows["train"]
    if not plan.validation_fraction or train is None:
        return rows
    mask = pa.array([validation_side(e, plan.seed, plan.validation_fraction)
                     for e in train.column("example_id").to_pylist()], type=pa.bool_())
    return {**rows, "train": train.filter(pc.invert(mask)), "validation": train.filter(mask)}


def staged(root: str, bucket: int) -> str:
    return storage.join(root, "_staging", f"b{bucket:05d}")


def final(root: str, split: str, bucket: int) -> str:
    return storage.join(root, split, f"part-{bucket:05d}.parquet")


def finalize_bucket(plan: BucketPlan, bucket: int) -> dict[str, Any]:
    """Dedupe, order, pack and write one bucket; return its summary (see the module docstring)."""
    fs, folder = storage.resolve(staged(plan.root, bucket))
    parts = storage.list_files(fs, folder)
    tables = {split: [pq.read_table(f"{folder}/{name}", filesystem=fs) for name in sorted(parts)
                      if name.startswith(f"{split}-")] for split in ("train", "eval")}
    out: dict[str, Any] = {"bucket": bucket, "rows": {}, "examples": {}, "digests": {}, "tokens": {},
                           "truncated": 0, "duplicates": 0, "eval_keys": []}
    rows = {split: pa.concat_tables(t) if t else None for split, t in tables.items()}
    if plan.dedupe:
        rows, out["duplicates"] = _dedupe(rows)
    rows = _carve_validation(plan, rows)  # after dedupe: an example eval holds never reaches it
    for split in ("eval", "validation", "train"):
        table = rows.get(split)
        if table is None or table.num_rows == 0:
            continue
        keys = [order_key(e, plan.seed) for e in table.column("example_id").to_pylist()]
        table = table.take(pa.array(np.argsort(np.array(keys), kind="stable")))
        if split == "eval":
            out["eval_keys"] = sorted(keys)
        out["examples"][split] = table.num_rows
        out["truncated"] += int(pc.sum(table.column("truncated")).as_py() or 0)
        lengths = np.asarray(table.column("num_tokens"))
        out["tokens"][split] = {"hist": np.bincount(lengths, minlength=plan.max_seq_len + 1).tolist(),
                                # classification: every token feeds the one label
                                "trained": int(np.asarray(table.column("num_trained" if "num_trained" in
                                                                       table.column_names else "num_tokens")).sum())}
        shard = _final_rows(plan, split, table)
        storage.write_parquet(shard, final(plan.root, split, bucket))
        out["rows"][split], out["digests"][split] = shard.num_rows, digest_rows(shard)
    return out


def _dedupe(rows: dict[str, pa.Table | None]) -> tuple[dict[str, pa.Table | None], int]:
    """One row per example id; eval keeps its copy and train loses any example eval has. Which copy
    survives does not matter: equal ids mean equal content, hence equal tokens."""
    dropped, kept, seen = 0, {}, set()
    for split in ("eval", "train"):
        table = rows[split]
        if table is None:
            kept[split] = None
            continue
        mask = []
        for ex_id in table.column("example_id").to_pylist():
            mask.append(ex_id not in seen)
            seen.add(ex_id)
        kept[split] = table.filter(pa.array(mask))
        dropped += table.num_rows - kept[split].num_rows
    return kept, dropped


def _final_rows(plan: BucketPlan, split: str, table: pa.Table) -> pa.Table:
    split = "eval" if split == "validation" else split  # scored like eval rows
    if plan.task == "token_cls":
        return _token_rows(plan, split, table)
    if plan.task == "seq_cls":
        ids = label_ids(table.column("label_name"), plan.label_names)
        out = pa.table({"input_ids": table.column("input_ids"), "label": ids})
        if split == "eval":
            out = out.append_column("example_id", table.column("example_id")).append_column("text", table.column("text"))
        return out.cast(SCHEMAS[plan.task, split])
    if split == "eval":
        return with_positions(table.select(["input_ids", "labels", "example_id", "prompt_len", "reference"]))
    if not plan.packed:
        return with_positions(table.select(["input_ids", "labels"]))
    windows = [pack_table(table.slice(i, PACK_WINDOW).select(["input_ids", "labels"]), plan.max_seq_len)
               for i in range(0, table.num_rows, PACK_WINDOW)]
    return pa.concat_tables(windows)


def _token_rows(plan: BucketPlan, split: str, table: pa.Table) -> pa.Table:
    """Word tags to class ids, and token labels aligned as `workflows.token_tags.token_labels` says."""
    index = {t: i for i, t in enumerate(plan.label_names or [])}
    inside = inside_ids(plan.label_names or [])
    word_labels = [[index[t] for t in tags] for tags in table.column("word_tags").to_pylist()]
    labels = [token_labels(w, tags, inside, plan.label_all_tokens)
              for w, tags in zip(table.column("word_ids").to_pylist(), word_labels)]
    out = {"input_ids": table.column("input_ids"), "labels": pa.array(labels, LIST_I32)}
    if split == "eval":
        out |= {"example_id": table.column("example_id"), "word_ids": table.column("word_ids"),
                "word_labels": pa.array(word_labels, LIST_I32), "text": table.column("text"),
                "word_starts": table.column("word_starts"), "word_ends": table.column("word_ends")}
    return pa.table(out).cast(SCHEMAS[plan.task, split])


def cap_eval(plan: BucketPlan, bucket: int, threshold: str) -> dict[str, Any]:
    """Keep the eval rows of a bucket whose order key is at most `threshold` (`data.max_eval_rows`:
    the first rows of the seeded order, over all buckets); return the new row count and digest."""
    fs, path = storage.resolve(final(plan.root, "eval", bucket))
    table = pq.read_table(path, filesystem=fs)
    keep = [order_key(e, plan.seed) <= threshold for e in table.column("example_id").to_pylist()]
    table = table.filter(pa.array(keep))
    if table.num_rows == 0:
        fs.delete_file(path)
        return {"bucket": bucket, "rows": 0, "digest": (0, 0)}
    with fs.open_output_stream(path) as f:
        pq.write_table(table, f)
    return {"bucket": bucket, "rows": table.num_rows, "digest": digest_rows(table)}


def write_empty(root: str, task: str, split: str) -> str:
    """An empty `split/part-00000.parquet` with the split's schema, so readers always find one."""
    schema = SCHEMAS[task, "eval" if split == "validation" else split]
    storage.write_parquet(schema.empty_table(), storage.join(root, split, "part-00000.parquet"))
    return f"{split}/part-00000.parquet"
