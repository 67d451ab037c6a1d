"""The write side of the prepare stage: a Ray Data datasink that routes, packs and summarises.

Each write task receives a bundle of encoded rows (`workflows.prepare.encode`), in stream
order, and writes up to three files named after its task index:

    rejects/part-<task>.parquet   source, row, reason, detail, raw
    eval/part-<task>.parquet      unpacked rows + example_id, prompt_len, reference (causal)
                                  or input_ids, label_name, example_id, text (classification)
    train/part-<task>.parquet     packed rows (causal LM, when packing) or unpacked rows

It returns a small summary (counts, token histograms, label counts, row digests), so the whole
stage is one pass over the data: statistics come back with the write results instead of from
re-reading the output. Packing happens here, per bundle: a bundle is a deterministic slice of
the ordered stream (`min_rows_per_write` rows), so the same input packs the same way every run.
Classification files carry `label_name`; the driver turns names into ids once the vocabulary
is known (`finalize_splits`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import BlockAccessor
from ray.data.datasource import Datasink

from workflows.prepare.packing import pack_table, with_positions
from workflows.prepare.stats import batch_summary, combine_digests, digest_rows

ROWS_PER_WRITE = 8192  # rows per write task (and packing window); about one shard file each

REJECT_COLUMNS = ["source", "row", "reason", "detail", "raw"]
CAUSAL_EVAL_EXTRA = ["example_id", "prompt_len", "reference"]
CLS_COLUMNS = ["input_ids", "label_name"]
CLS_EVAL_EXTRA = ["example_id", "text"]


class TokenizedShardWriter(Datasink):
    """Writes `rejects/`, `eval/` and `train/` Parquet shards under `root` (see module doc)."""

    def __init__(self, root: str | Path, task: str, packed: bool, max_seq_len: int,
                 rows_per_write: int = ROWS_PER_WRITE):
        self.root, self.task, self.packed = str(root), task, packed
        self.max_seq_len, self.rows_per_write = max_seq_len, rows_per_write
        self.results: list[dict[str, Any]] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_write

    @property
    def supports_distributed_writes(self) -> bool:
        return False  # the stage directory is a local temp dir on the driver's node

    def _splits(self, table: pa.Table) -> dict[str, pa.Table]:
        def rows(kind: str) -> pa.Table:
            return table.filter(pc.equal(table.column("kind"), kind))

        if self.task == "seq_cls":
            train, evals = rows("train").select(CLS_COLUMNS), rows("eval").select(CLS_COLUMNS + CLS_EVAL_EXTRA)
        else:
            train = rows("train").select(["input_ids", "labels"])
            train = pack_table(train, self.max_seq_len) if self.packed else with_positions(train)
            evals = with_positions(rows("eval").select(["input_ids", "labels", *CAUSAL_EVAL_EXTRA]))
        return {"rejects": rows("reject").select(REJECT_COLUMNS), "eval": evals, "train": train}

    def write(self, blocks: Any, ctx: Any) -> dict[str, Any]:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"summary": None, "files": {}, "digests": {}}
        table = pa.concat_tables(tables)
        files, digests = {}, {}
        for split, rows in self._splits(table).items():
            if rows.num_rows == 0:
                continue
            path = Path(self.root) / split / f"part-{ctx.task_idx:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(rows, path)
            files[split] = str(path)
            if split != "rejects":
                digests[split] = digest_rows(rows)
        return {"summary": batch_summary(table, self.max_seq_len), "files": files, "digests": digests}

    def on_write_complete(self, write_result: Any) -> None:
        self.results = [r for r in write_result.write_returns if r["summary"] is not None]


# ----------------------------------------------------------------------------- driver side

LIST_I32 = pa.list_(pa.int32())
SCHEMAS = {
    "rejects": pa.schema([("source", pa.string()), ("row", pa.int64()), ("reason", pa.string()),
                          ("detail", pa.string()), ("raw", pa.string())]),
    ("causal_lm", "train"): pa.schema([("input_ids", LIST_I32), ("labels", LIST_I32),
                                       ("position_ids", LIST_I32), ("num_examples", pa.int32())]),
    ("seq_cls", "train"): pa.schema([("input_ids", LIST_I32), ("label", pa.int64())]),
}
SCHEMAS["causal_lm", "eval"] = pa.schema([*SCHEMAS["causal_lm", "train"], ("example_id", pa.string()),
                                          ("prompt_len", pa.int32()), ("reference", pa.string())])
SCHEMAS["seq_cls", "eval"] = pa.schema([*SCHEMAS["seq_cls", "train"], ("example_id", pa.string()),
                                        ("text", pa.string())])


def _cap_rows(files: list[Path], limit: int) -> list[Path]:
    """Keep the first `limit` rows (stream order); drop the rest. Only touches the file where
    the cap falls and deletes the files after it."""
    kept, seen = [], 0
    for f in files:
        if seen >= limit:
            f.unlink()
            continue
        n = pq.read_metadata(f).num_rows
        if seen + n > limit:
            pq.write_table(pq.read_table(f).slice(0, limit - seen), f)
            n = limit - seen
        kept.append(f)
        seen += n
    return kept


def _label_ids(f: Path, label_names: list[str]) -> None:
    table = pq.read_table(f)
    ids = pc.index_in(table.column("label_name"), value_set=pa.array(label_names, pa.string())).cast(pa.int64())
    at = table.schema.get_field_index("label_name")
    pq.write_table(table.set_column(at, "label", ids), f)


def _reshard(files: list[Path], target: int) -> list[Path]:
    """At least `target` files (when there are that many rows). Only runs when the writers made
    fewer files than that, i.e. on small data: the rows are re-cut in order into equal slices."""
    rows = sum(pq.read_metadata(f).num_rows for f in files)
    if len(files) >= target or rows <= len(files):
        return files
    table = pa.concat_tables([pq.read_table(f) for f in files])
    for f in files:
        f.unlink()
    pieces = min(target, rows)
    bounds = [round(i * rows / pieces) for i in range(pieces + 1)]
    out = []
    for i in range(pieces):
        path = files[0].parent / f"resharded-{i:05d}.parquet"
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), path)
        out.append(path)
    return out


def _dense_names(directory: Path, files: list[Path], schema: pa.Schema) -> list[str]:
    """Rename to part-00000.parquet, part-00001.parquet, ... in order (an empty split gets one
    empty file so readers always find the schema). Returns paths relative to the stage dir."""
    directory.mkdir(parents=True, exist_ok=True)
    if not files:
        empty = directory / ".empty.parquet"
        pq.write_table(schema.empty_table(), empty)
        files = [empty]
    staged = []
    for i, f in enumerate(files):
        tmp = directory / f".rename-{i:05d}"
        f.rename(tmp)
        staged.append(tmp)
    names = []
    for i, tmp in enumerate(staged):
        tmp.rename(directory / f"part-{i:05d}.parquet")
        names.append(f"{directory.name}/part-{i:05d}.parquet")
    return names


def finalize_splits(root: Path, results: list[dict[str, Any]], task: str, label_names: list[str] | None,
                    max_eval_rows: int | None, num_shards: int) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Turn the writers' files into the final shards; returns (shards, rows digests) per split."""
    shards, digests = {}, {}
    salt = "|".join(label_names or [])
    for split in ("rejects", "eval", "train"):
        files = sorted(Path(r["files"][split]) for r in results if split in r["files"])
        parts = [tuple(r["digests"][split]) for r in results if split in r["digests"]]
        if split == "eval" and max_eval_rows is not None:
            capped = _cap_rows(files, max_eval_rows)
            if capped != files or sum(p[1] for p in parts) > max_eval_rows:
                parts = [digest_rows(pq.read_table(f)) for f in capped]  # <= max_eval_rows rows
            files = capped
        if label_names is not None and split != "rejects":
            for f in files:
                _label_ids(f, label_names)
        files = _reshard(files, 1 if split == "rejects" else num_shards)
        schema = SCHEMAS["rejects"] if split == "rejects" else SCHEMAS[task, split]
        shards[split] = _dense_names(root / split, files, schema)
        if split != "rejects":
            digests[split] = combine_digests(parts, salt)
    return shards, digests
