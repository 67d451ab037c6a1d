"""Collate prepared rows into the tensors a model is fed (train and evaluate share these).

Input: one batch of prepared rows as columns, `{column: sequence of rows}` (what Ray Data's
`iter_torch_batches(collate_fn=...)` hands over: numpy object arrays of int32 arrays, or a 2-D
array when every row has the same length; plain lists work too). No Ray here: the training loop
wraps a collator in Ray's `NumpyBatchCollateFn` (`workflows.train.loop`). Columns are those of
`docs/artifacts.md`; columns a collator does not use are ignored.

Output (all int64, B rows, T = longest row, rounded up to `pad_to_multiple_of`):

- packed causal: `input_ids`, `labels`, `position_ids` and **no** `attention_mask`. With no mask,
  transformers 5 derives per-example attention from `position_ids` (a new example starts wherever a
  position does not follow its predecessor), so padding is made its own segment: positions restart
  at 0 and labels are -100. Call the model with `use_cache=False`.
- unpacked causal: right-padded `input_ids`, `attention_mask` (1 = token), `labels` (-100 on
  padding, chosen by position: a pad id inside a row keeps its label).
- classification: right-padded `input_ids`, `attention_mask`, `labels` (B,).

Labels are not shifted: the logits at position t predict `labels[:, t + 1]` (`causal_token_nll`).

With `loss_positions=True` (the training loop) a causal batch also carries, per row, the positions
whose logits score a label and those labels: `loss_positions` (B, K) and `loss_targets` (B, K), K =
the most label tokens of any row, padded with position 0 and target -100. Computed here, on the host,
so the loop never asks the device how many there are. `label_token_nll` scores only those positions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

IGNORE_INDEX = -100

Batch = Mapping[str, Sequence[Any]]


def _rows(batch: Batch, column: str) -> list[np.ndarray]:
    if column not in batch:
        raise KeyError(f"batch has no column {column!r} (columns: {sorted(batch)}); "
                       "was the data written by the prepare stage for this task?")
    return [np.asarray(row, dtype=np.int64) for row in batch[column]]


def _row_name(batch: Batch, i: int) -> str:
    ids = batch.get("example_id")
    return f"row {i} of the batch" + (f" (example_id {ids[i]!r})" if ids is not None else "")


def _padded_length(rows: list[np.ndarray], multiple: int) -> int:
    if not rows:
        raise ValueError("cannot collate an empty batch")
    longest = max(len(r) for r in rows)
    if longest == 0:
        raise ValueError("every row of the batch is empty (0 tokens)")
    return -(-longest // multiple) * multiple


def _check_same_lengths(batch: Batch, columns: dict[str, list[np.ndarray]]) -> None:
    (first, first_rows), *others = columns.items()
    for name, rows in others:
        for i, (a, b) in enumerate(zip(first_rows, rows, strict=True)):
            if len(a) != len(b):
                raise ValueError(f"{_row_name(batch, i)}: {first!r} has {len(a)} tokens but "
                                 f"{name!r} has {len(b)}; prepared columns must have equal lengths")


def _right_pad(rows: list[np.ndarray], length: int, value: int) -> np.ndarray:
    out = np.full((len(rows), length), value, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _attention_mask(rows: list[np.ndarray], length: int) -> np.ndarray:
    lengths = np.array([len(r) for r in rows])
    return (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)


@dataclass(frozen=True)
class CausalCollator:
    """Causal-LM batches; `packed` selects the packed layout (see the module docstring)."""

    pad_token_id: int
    packed: bool
    pad_to_multiple_of: int = 1
    loss_positions: bool = False

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        input_ids, labels = _rows(batch, "input_ids"), _rows(batch, "labels")
        columns = {"input_ids": input_ids, "labels": labels}
        if self.packed:
            columns["position_ids"] = _rows(batch, "position_ids")
        _check_same_lengths(batch, columns)
        length = _padded_length(input_ids, self.pad_to_multiple_of)
        out = {
            "input_ids": _right_pad(input_ids, length, self.pad_token_id),
            "labels": _right_pad(labels, length, IGNORE_INDEX),
        }
        if self.packed:
            positions = _right_pad(columns["position_ids"], length, 0)
            for i, row in enumerate(input_ids):
                positions[i, len(row):] = np.arange(length - len(row))  # padding = its own segment
            out["position_ids"] = positions
        else:
            out["attention_mask"] = _attention_mask(input_ids, length)
        if self.loss_positions:
            out["loss_positions"], out["loss_targets"] = _loss_positions(out["labels"])
        return {k: torch.from_numpy(v) for k, v in out.items()}


def _loss_positions(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions (B, K), targets (B, K)): where position t's logits score label t + 1."""
    scored = labels[:, 1:] != IGNORE_INDEX
    width = max(1, int(scored.sum(axis=1).max(initial=0)))
    positions = np.zeros((len(labels), width), dtype=np.int64)
    targets = np.full((len(labels), width), IGNORE_INDEX, dtype=np.int64)
    for i, row in enumerate(scored):
        where = np.flatnonzero(row)
        positions[i, : len(where)] = where
        targets[i, : len(where)] = labels[i, where + 1]
    return positions, targets


@dataclass(frozen=True)
class ClassificationCollator:
    """Sequence-classification batches: right-padded tokens, mask and one label per row."""

    pad_token_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, batch: Batch) -> dict[str, torch.Tensor]:
        input_ids = _rows(batch, "input_ids")
        if "label" not in batch:
            raise KeyError(f"batch has no column 'label' (columns: {sorted(batch)})")
        length = _padded_length(input_ids, self.pad_to_multiple_of)
        return {
            "input_ids": torch.from_numpy(_right_pad(input_ids, length, self.pad_token_id)),
            "attention_mask": torch.from_numpy(_attention_mask(input_ids, length)),
            "labels": torch.as_tensor(np.asarray(batch["label"], dtype=np.int64)),
        }


def collator_for(manifest: Mapping[str, Any], split: str, pad_to_multiple_of: int = 1,
                 loss_positions: bool = False) -> Callable[[Batch], dict]:
    """The collator for one split ("train" or "eval") of a prepared dataset, from its manifest.

    Only train data is ever packed (`manifest["packed"]`); eval rows are always unpacked.
    `loss_positions`: causal batches carry `loss_positions` / `loss_targets` (module docstring).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    try:
        pad_token_id = int(manifest["tokenizer"]["pad_token_id"])
        task = manifest["task"]
    except (KeyError, TypeError) as e:
        raise KeyError(f"prepared manifest lacks {e}: expected 'task' and 'tokenizer.pad_token_id'") from None
    if task == "seq_cls":
        return ClassificationCollator(pad_token_id, pad_to_multiple_of)
    if task == "causal_lm":
        packed = bool(manifest.get("packed")) and split == "train"
        return CausalCollator(pad_token_id, packed, pad_to_multiple_of, loss_positions)
    raise ValueError(f"prepared manifest field 'task' is {task!r}; expected 'causal_lm' or 'seq_cls'")


def causal_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood of the next token, and which tokens count.

    logits (B, T, V) predict labels (B, T) shifted by one: position t scores `labels[:, t + 1]`.
    Returns `nll` (B, T-1) float32, 0 where ignored, and `mask` (B, T-1) bool. Summing `nll` and
    dividing by a (possibly global) `mask.sum()` gives a loss where every label token weighs the same.
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                          ignore_index=IGNORE_INDEX, reduction="none").view_as(targets)
    return nll, mask


def label_token_nll(logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """Sum of the next-token NLL over the scored positions, in fp32, a chunk of rows at a time.

    logits (B, K, V) at the positions `loss_positions` names (any dtype: bf16 under autocast),
    targets (B, K) with -100 where a row has fewer. Each chunk is cast to fp32, scored and dropped;
    backward recomputes it (checkpointed), so no fp32 copy of the logits is ever whole, and no
    logits of positions without a label exist at all (the model was asked only for these). Equals
    `causal_token_nll(full logits, labels).sum()` (values and gradients; tests/test_collate.py).
    """
    flat, flat_targets = logits.flatten(0, 1), targets.flatten()
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk_rows):
        part, part_targets = flat[start:start + chunk_rows], flat_targets[start:start + chunk_rows]
        if part.requires_grad:
            total = total + torch.utils.checkpoint.checkpoint(_nll_sum, part, part_targets, use_reentrant=False)
        else:
            total = total + _nll_sum(part, part_targets)
    return total


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
