"""The micro-batches one training worker consumes, epoch after epoch.

The prepare stage already wrote the train split in a seeded random order. On top of it, every
epoch reads this worker's shard through a local shuffle buffer seeded by (seed, epoch), so no
two epochs see the same batches, and a resumed run sees exactly the batches the interrupted one
would have (the data position is a count of micro-batches within the epoch).

With `group_by_length` (on by default for unpacked rows: classification, unpacked causal LM) a
window of `WINDOW_BATCHES` batches is sorted by length and cut into batches, whose order is then
shuffled: rows of like length share a batch, so little of a batch is padding (HF's
`group_by_length`). Packed rows are all close to `max_seq_len` and need none of this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

WINDOW_BATCHES = 32  # batches sorted by length together (group_by_length)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % 2**31


def micro_batches(shard: Any, collate: Callable[[dict[str, Any]], dict[str, torch.Tensor]], batch_size: int,
                  device: torch.device, seed: int, epoch: int, shuffle_rows: int,
                  group_by_length: bool) -> Iterator[dict[str, torch.Tensor]]:
    """This epoch's micro-batches of `shard` (a Ray `DataIterator`), collated onto `device`."""
    window = batch_size * (WINDOW_BATCHES if group_by_length else 1)
    shuffle = {"local_shuffle_buffer_size": shuffle_rows, "local_shuffle_seed": epoch_seed(seed, epoch)} \
        if shuffle_rows else {}
    for w, rows in enumerate(shard.iter_batches(batch_size=window, batch_format="numpy", **shuffle)):
        n = len(rows["input_ids"])
        chunks = [np.arange(n)]
        if group_by_length:
            order = np.argsort([len(x) for x in rows["input_ids"]], kind="stable")
            chunks = [order[i:i + batch_size] for i in range(0, n, batch_size)]
            rng = np.random.default_rng([seed, epoch, w])
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        for index in chunks:
            batch = collate({name: column[index] for name, column in rows.items()})
            yield {k: t.to(device, non_blocking=True) for k, t in batch.items()}
