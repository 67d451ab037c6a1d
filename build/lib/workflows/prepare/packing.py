"""Packing: several tokenized examples per `max_seq_len` row, kept apart by restarted positions.

A packed row is the concatenation of whole examples (never split), unpadded:

    input_ids    = ex1 ids        + ex2 ids        + ...
    labels       = -100, ex1[1:]  + -100, ex2[1:]  + ...   (each example's first label masked)
    position_ids = 0..len(ex1)-1  + 0..len(ex2)-1  + ...
    num_examples = number of examples in the row

The first label of each example is masked because transformers shifts labels inside the model:
position t predicts `labels[t + 1]`, so the last token of ex1 would otherwise be trained to
predict ex2's first token. Attention stays inside each example only when the model is fed
`position_ids` with `use_cache=False` and no `attention_mask` (see docs/artifacts.md).

Bins are filled first-fit-decreasing within one batch of examples: the batch is a deterministic
slice of the ordered stream, so the same input always packs the same way.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from workflows.prepare.formats import IGNORE_INDEX

PACKED_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                           ("position_ids", pa.list_(pa.int32())), ("num_examples", pa.int32())])


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Group example indices into bins of total length <= capacity (each length <= capacity).

    Longest first, each into the first bin with room; within a bin, indices keep stream order.
    """
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"an example of {lengths.max()} tokens does not fit max_seq_len {capacity}")
    order = np.argsort(-lengths, kind="stable")
    room = np.empty(len(lengths), dtype=np.int64)
    bins: list[list[int]] = []
    for i in order:
        fits = np.flatnonzero(room[: len(bins)] >= lengths[i])
        if len(fits):
            b = fits[0]
        else:
            b = len(bins)
            bins.append([])
            room[b] = capacity
        bins[b].append(int(i))
        room[b] -= lengths[i]
    return [sorted(b) for b in bins]


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat int32 values, offsets) of a list<int32> column, without Python lists."""
    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    return values[offsets[0]:offsets[-1]], offsets - offsets[0]


def pack_table(table: pa.Table, max_seq_len: int) -> pa.Table:
    """Pack a batch of unpacked examples (`input_ids`, `labels` list<int32>) into packed rows."""
    if table.num_rows == 0:
        return PACKED_SCHEMA.empty_table()
    ids, offsets = _list_column(table, "input_ids")
    labels, _ = _list_column(table, "labels")
    lengths = np.diff(offsets)
    out_ids, out_labels, out_pos, counts = [], [], [], []
    for members in first_fit_decreasing(lengths, max_seq_len):
        spans = [(offsets[i], offsets[i + 1]) for i in members]
        row_labels = np.concatenate([labels[a:b] for a, b in spans])
        starts = np.cumsum([0] + [b - a for a, b in spans[:-1]])
        row_labels[starts] = IGNORE_INDEX
        out_ids.append(np.concatenate([ids[a:b] for a, b in spans]))
        out_labels.append(row_labels)
        out_pos.append(np.concatenate([np.arange(b - a, dtype=np.int32) for a, b in spans]))
        counts.append(len(members))
    return pa.Table.from_arrays([_to_list_array(out_ids), _to_list_array(out_labels), _to_list_array(out_pos),
                                 pa.array(counts, pa.int32())], schema=PACKED_SCHEMA)


def _to_list_array(rows: list[np.ndarray]) -> pa.ListArray:
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(rows).astype(np.int32)))


def with_positions(batch: pa.Table) -> pa.Table:
    """Unpacked rows in the packed schema: `position_ids` 0..n-1 and `num_examples` 1."""
    _, offsets = _list_column(batch, "input_ids")
    lengths = np.diff(offsets)
    # position of each flat token = its index minus the start of its row
    positions = (np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)).astype(np.int32)
    position_ids = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(positions))
    index = batch.schema.get_field_index("labels") + 1 if "labels" in batch.column_names else batch.num_columns
    batch = batch.add_column(index, "position_ids", position_ids)
    return batch.add_column(index + 1, "num_examples", pa.array(np.ones(batch.num_rows, np.int32)))
